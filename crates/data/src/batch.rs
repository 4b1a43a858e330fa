//! From examples to batches: best-fit-decreasing packing of examples into `max_length` rows with
//! per-document position ids and segment ids (so attention never crosses documents), padding to
//! the longest row, seeded shuffling and the train/eval split. The trainer turns a [`Batch`] into
//! tensors.

use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::example::Example;

/// A batch of `rows` sequences of `seq_len` tokens, row-major (`[rows, seq_len]` flattened).
///
/// `segment_ids` number the documents of a row from 1 (0 is padding): a token attends to an
/// earlier token only when both have the same segment id, which gives the block-diagonal causal
/// mask. `position_ids` restart at 0 for every document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    pub labels_mask: Vec<bool>,
    /// `true` for real tokens, `false` for padding.
    pub attention_mask: Vec<bool>,
    pub position_ids: Vec<u32>,
    pub segment_ids: Vec<u32>,
}

impl Batch {
    /// One example per row, padded with `pad_id` to the longest.
    pub fn padded(examples: &[&Example], pad_id: u32) -> Self {
        let groups: Vec<Vec<&Example>> = examples.iter().map(|e| vec![*e]).collect();
        Self::from_rows(&groups, pad_id)
    }

    /// Rows each holding several documents back to back, padded to the longest row.
    pub fn from_rows(rows: &[Vec<&Example>], pad_id: u32) -> Self {
        let seq_len = rows
            .iter()
            .map(|r| r.iter().map(|e| e.len()).sum::<usize>())
            .max()
            .unwrap_or(0);
        let n = rows.len() * seq_len;
        let mut b = Batch {
            rows: rows.len(),
            seq_len,
            input_ids: Vec::with_capacity(n),
            labels_mask: Vec::with_capacity(n),
            attention_mask: Vec::with_capacity(n),
            position_ids: Vec::with_capacity(n),
            segment_ids: Vec::with_capacity(n),
        };
        for row in rows {
            let mut used = 0;
            for (doc, e) in row.iter().enumerate() {
                b.input_ids.extend_from_slice(&e.input_ids);
                b.labels_mask.extend_from_slice(&e.labels_mask);
                b.attention_mask.extend(std::iter::repeat_n(true, e.len()));
                b.position_ids.extend(0..e.len() as u32);
                b.segment_ids
                    .extend(std::iter::repeat_n(doc as u32 + 1, e.len()));
                used += e.len();
            }
            let pad = seq_len - used;
            b.input_ids.extend(std::iter::repeat_n(pad_id, pad));
            b.labels_mask.extend(std::iter::repeat_n(false, pad));
            b.attention_mask.extend(std::iter::repeat_n(false, pad));
            b.position_ids.extend(std::iter::repeat_n(0, pad));
            b.segment_ids.extend(std::iter::repeat_n(0, pad));
        }
        b
    }

    /// Whether token `j` may attend to token `i` in `row` (causal and within one document).
    pub fn may_attend(&self, row: usize, j: usize, i: usize) -> bool {
        let s = |k: usize| self.segment_ids[row * self.seq_len + k];
        i <= j && s(i) != 0 && s(i) == s(j)
    }
}

/// How examples are grouped into batches.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Rows per batch.
    pub batch_size: usize,
    /// Pack documents into rows of this many tokens (best-fit-decreasing); `None` pads one
    /// example per row to the longest in its batch.
    pub pack_length: Option<usize>,
    /// Token id of padding.
    pub pad_id: u32,
    /// Seed of the order of rows.
    pub seed: u64,
}

/// All of `examples` as batches: rows are formed (one example each, or packed), shuffled with
/// the seed, and cut into batches of `batch_size` rows (the last may be smaller).
pub fn make_batches(examples: &[Example], config: &BatchConfig) -> Vec<Batch> {
    let mut rows: Vec<Vec<usize>> = match config.pack_length {
        Some(capacity) => {
            let lengths: Vec<usize> = examples.iter().map(Example::len).collect();
            pack_best_fit_decreasing(&lengths, capacity)
        }
        None => (0..examples.len()).map(|i| vec![i]).collect(),
    };
    shuffle(&mut rows, config.seed);
    rows.chunks(config.batch_size.max(1))
        .map(|chunk| {
            let docs: Vec<Vec<&Example>> = chunk
                .iter()
                .map(|row| row.iter().map(|&i| &examples[i]).collect())
                .collect();
            Batch::from_rows(&docs, config.pad_id)
        })
        .collect()
}

/// Best-fit-decreasing packing: indices of `lengths` grouped into bins of at most `capacity`
/// tokens, longest first, each into the fullest bin it still fits. Lengths above `capacity` get a
/// bin of their own (truncate first to avoid them).
pub fn pack_best_fit_decreasing(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    // Free space -> bins with that much free space; the best fit is the smallest free space
    // that still holds the item.
    let mut free: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut room: Vec<usize> = Vec::new();
    for i in order {
        let len = lengths[i];
        let fit = free.range(len..).next().map(|(&f, _)| f);
        let bin = match fit {
            Some(f) => {
                let list = free.get_mut(&f).expect("key just found");
                let bin = list.pop().expect("lists are never left empty");
                if list.is_empty() {
                    free.remove(&f);
                }
                bin
            }
            None => {
                bins.push(Vec::new());
                room.push(capacity.max(len));
                bins.len() - 1
            }
        };
        bins[bin].push(i);
        room[bin] -= len;
        if room[bin] > 0 {
            free.entry(room[bin]).or_default().push(bin);
        }
    }
    bins
}

/// Shuffles `items` with a seeded generator: the same seed gives the same order everywhere.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    items.shuffle(&mut rng);
}

/// Splits off the last `eval_ratio` of `items` (rounded, at least one when the ratio is above 0
/// and there are two or more items): `(train, eval)`. Shuffle first for a random split.
pub fn split_eval<T>(mut items: Vec<T>, eval_ratio: f64) -> (Vec<T>, Vec<T>) {
    let n = items.len();
    let mut k = (n as f64 * eval_ratio.clamp(0.0, 1.0)).round() as usize;
    if eval_ratio > 0.0 && k == 0 && n >= 2 {
        k = 1;
    }
    let eval = items.split_off(n - k.min(n));
    (items, eval)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32]) -> Example {
        Example {
            input_ids: ids.to_vec(),
            labels_mask: ids.iter().map(|&i| i % 2 == 0).collect(),
        }
    }

    #[test]
    fn bfd_fills_bins_best_first() {
        let lengths = [5, 4, 3, 3, 2, 2, 1];
        let bins = pack_best_fit_decreasing(&lengths, 7);
        for b in &bins {
            assert!(b.iter().map(|&i| lengths[i]).sum::<usize>() <= 7);
        }
        let mut all: Vec<usize> = bins.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..lengths.len()).collect::<Vec<_>>());
        // 20 tokens in bins of 7: three bins is optimal, and BFD finds it here.
        assert_eq!(bins.len(), 3);
        assert_eq!(bins[0], vec![0, 4]); // 5 + 2
        assert_eq!(pack_best_fit_decreasing(&[9], 4), vec![vec![0]]);
    }

    #[test]
    fn packed_rows_isolate_documents() {
        let (a, b, c) = (ex(&[1, 2, 3]), ex(&[4, 5]), ex(&[6, 7, 8, 9]));
        let batch = Batch::from_rows(&[vec![&a, &b], vec![&c]], 0);
        assert_eq!((batch.rows, batch.seq_len), (2, 5));
        assert_eq!(batch.input_ids, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 0]);
        assert_eq!(batch.position_ids, vec![0, 1, 2, 0, 1, 0, 1, 2, 3, 0]);
        assert_eq!(batch.segment_ids, vec![1, 1, 1, 2, 2, 1, 1, 1, 1, 0]);
        assert_eq!(
            batch.attention_mask,
            vec![true, true, true, true, true, true, true, true, true, false]
        );
        assert!(!batch.labels_mask[9]);
        assert!(batch.may_attend(0, 2, 0));
        assert!(
            !batch.may_attend(0, 3, 2),
            "document 2 must not see document 1"
        );
        assert!(!batch.may_attend(0, 1, 2), "no attention to the future");
        assert!(!batch.may_attend(1, 4, 0), "padding attends to nothing");
    }

    #[test]
    fn batches_cover_every_example_once_in_a_seeded_order() {
        let examples: Vec<Example> = (1..=9u32).map(|n| ex(&vec![n; n as usize])).collect();
        for pack_length in [None, Some(12)] {
            let config = BatchConfig {
                batch_size: 2,
                pack_length,
                pad_id: 0,
                seed: 5,
            };
            let batches = make_batches(&examples, &config);
            assert_eq!(batches, make_batches(&examples, &config));
            let mut tokens: Vec<u32> = batches
                .iter()
                .flat_map(|b| b.input_ids.iter().copied().filter(|&t| t != 0))
                .collect();
            tokens.sort();
            let mut expected: Vec<u32> =
                examples.iter().flat_map(|e| e.input_ids.clone()).collect();
            expected.sort();
            assert_eq!(tokens, expected, "{pack_length:?}");
            if let Some(cap) = pack_length {
                assert!(batches.iter().all(|b| b.seq_len <= cap));
                assert!(batches.iter().map(|b| b.rows).sum::<usize>() < examples.len());
            }
        }
    }

    #[test]
    fn padding_and_seeded_shuffle_and_split() {
        let (a, b) = (ex(&[1, 2, 3]), ex(&[4]));
        let batch = Batch::padded(&[&a, &b], 7);
        assert_eq!(batch.input_ids, vec![1, 2, 3, 4, 7, 7]);
        let mut x: Vec<u32> = (0..50).collect();
        let mut y = x.clone();
        shuffle(&mut x, 3);
        shuffle(&mut y, 3);
        assert_eq!(x, y);
        assert_ne!(x, (0..50).collect::<Vec<_>>());
        let (train, eval) = split_eval(x, 0.1);
        assert_eq!((train.len(), eval.len()), (45, 5));
        assert_eq!(split_eval(vec![1, 2], 0.01).1, vec![2]);
    }
}
