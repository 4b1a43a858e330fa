//! The documents of packed rows as attention sees them: which keys each query must not see
//! (another document's) as a mask, which every attention path takes, and, when each document
//! is one run of positions (as packing lays them out), as each query's first visible key,
//! which the chunked attention's GPU kernels take instead of the mask (no mask is read or
//! filled there; see `chunked_attention`). A sliding window's bound takes the same two forms.

use std::collections::HashSet;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};

/// Which keys the queries of packed rows see beyond causality.
#[derive(Debug, Clone)]
pub struct Documents<B: Backend> {
    /// `[batch, 1, seq, seq]`, `true` where a query must not see a key.
    pub hidden: Tensor<B, 4, Bool>,
    /// `[batch, seq]`: each query's first visible key, when every document is one run of
    /// positions (the query at `p` then sees exactly keys `first..=p`). Positions are held as
    /// f32, exact up to 2^24.
    pub first_keys: Option<Tensor<B, 2>>,
}

impl<B: Backend> Documents<B> {
    /// The documents of rows whose tokens carry the ids `segments` (`batch × seq`, row-major):
    /// equal ids see each other, different ids never do.
    pub fn of_segments(segments: &[u32], batch: usize, seq: usize, device: &B::Device) -> Self {
        assert_eq!(segments.len(), batch * seq, "one segment id per token");
        let hidden: Vec<bool> = segments
            .chunks(seq.max(1))
            .flat_map(|row| row.iter().flat_map(|q| row.iter().map(move |k| q != k)))
            .collect();
        let hidden = Tensor::from_data(TensorData::new(hidden, [batch, 1, seq, seq]), device);
        let first_keys = runs_first_keys(segments, seq)
            .map(|first| Tensor::from_data(TensorData::new(first, [batch, seq]), device));
        Self { hidden, first_keys }
    }
}

/// Each token's first key of its own document, as f32, when every id of a row is one run of
/// positions; `None` when an id comes back after another (its keys are then no single run).
fn runs_first_keys(segments: &[u32], seq: usize) -> Option<Vec<f32>> {
    let mut first_keys = Vec::with_capacity(segments.len());
    for row in segments.chunks(seq.max(1)) {
        let mut ended = HashSet::new();
        let mut start = 0;
        for (position, id) in row.iter().enumerate() {
            if position > 0 && *id != row[position - 1] {
                ended.insert(row[position - 1]);
                if ended.contains(id) {
                    return None;
                }
                start = position;
            }
            first_keys.push(start as f32);
        }
    }
    Some(first_keys)
}

/// The positions a sliding window hides: query `i` (absolute position `seen - seq + i`) may see
/// key `j` only if `pos - window < j`. Causality is applied separately.
///
/// # Shapes
/// - output: `[1, 1, seq, seen]`, `true` where masked
pub(crate) fn window_mask<B: Backend>(
    seq: usize,
    seen: usize,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 4, Bool> {
    let offset = seen - seq;
    let data: Vec<bool> = (0..seq)
        .flat_map(|i| (0..seen).map(move |j| j + window <= offset + i))
        .collect();
    Tensor::from_data(TensorData::new(data, [1, 1, seq, seen]), device)
}

/// The first key each query sees through a sliding window of `window` keys, `[batch, seq]`
/// (queries and keys at the same positions, no cache): the query at `p` sees keys from
/// `p + 1 − window` on.
pub(crate) fn window_first_keys<B: Backend>(
    batch: usize,
    seq: usize,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let first: Vec<f32> = (0..batch)
        .flat_map(|_| (0..seq).map(|p| (p + 1).saturating_sub(window) as f32))
        .collect();
    Tensor::from_data(TensorData::new(first, [batch, seq]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn runs_give_each_query_its_documents_first_key() {
        let first = runs_first_keys(&[0, 0, 1, 1, 1, 2, 7, 7, 7, 7, 7, 7], 6);
        assert_eq!(
            first,
            Some(vec![
                0.0, 0.0, 2.0, 2.0, 2.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
            ])
        );
        // Rows are separate: an id may come back in the next row.
        assert!(runs_first_keys(&[0, 1, 0, 1], 2).is_some());
    }

    #[test]
    fn an_id_that_comes_back_has_no_first_key() {
        assert_eq!(runs_first_keys(&[0, 0, 1, 0], 4), None);
    }

    #[test]
    fn the_first_keys_agree_with_the_mask() {
        let (batch, seq) = (2, 5);
        let segments = [3, 3, 4, 4, 4, 0, 1, 1, 1, 2];
        let documents = Documents::<Flex>::of_segments(&segments, batch, seq, &Default::default());
        let hidden = documents.hidden.into_data().to_vec::<bool>().unwrap();
        let first = documents.first_keys.expect("runs").into_data();
        let first = first.to_vec::<f32>().unwrap();
        for b in 0..batch {
            for q in 0..seq {
                for k in 0..=q {
                    let seen = !hidden[(b * seq + q) * seq + k];
                    assert_eq!(
                        seen,
                        k as f32 >= first[b * seq + q],
                        "row {b}, query {q}, key {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_window_starts_window_keys_back() {
        let first = window_first_keys::<Flex>(2, 5, 3, &Default::default());
        let first = first.into_data().to_vec::<f32>().unwrap();
        assert_eq!(first, [0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 1.0, 2.0]);
    }
}
