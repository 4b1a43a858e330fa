//! Spelling a row-major matrix product as a column-major BLAS call (cuBLAS is column-major;
//! burn's tensors are row-major).
//!
//! A row-major `[r, c]` buffer read column-major is its `[c, r]` transpose, so the row-major
//! `C = op(L)·op(R)` is computed as the column-major `Cᵀ = op(R)ᵀ·op(L)ᵀ`: each operand's buffer
//! is passed as it is, `R`'s as BLAS's first operand, and each transpose flag carries over.
//! Operands ([`StridedOperand`]) are read in place where their strides allow: rows padded to a
//! pitch (as burn lays out CUDA tensors), transposed views, and a batched product's batches.

/// The arguments of a column-major `C = op(A)·op(B)` (`op(A)` is `m × k`, `op(B)` `k × n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ColumnMajorGemm {
    /// Whether BLAS's first operand (the row-major product's right-hand side) is transposed.
    pub transpose_a: bool,
    /// Whether BLAS's second operand (the row-major product's left-hand side) is transposed.
    pub transpose_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl ColumnMajorGemm {
    /// The call computing the row-major `[rows, cols]` result of `op(lhs)·op(rhs)`, `op`
    /// transposing where its flag is set, for operands of the given dims stored as their
    /// layouts say; `None` when the inner dimensions differ.
    pub fn for_row_major(
        (lhs, transpose_lhs, lhs_layout): ([usize; 2], bool, StridedOperand),
        (rhs, transpose_rhs, rhs_layout): ([usize; 2], bool, StridedOperand),
    ) -> Option<Self> {
        let [lhs_rows, lhs_cols] = lhs;
        let [rhs_rows, rhs_cols] = rhs;
        let (rows, inner) = if transpose_lhs {
            (lhs_cols, lhs_rows)
        } else {
            (lhs_rows, lhs_cols)
        };
        let (rhs_inner, cols) = if transpose_rhs {
            (rhs_cols, rhs_rows)
        } else {
            (rhs_rows, rhs_cols)
        };
        // A transposed view's buffer read column-major is the matrix itself, not its transpose:
        // its flag flips.
        (inner == rhs_inner).then_some(Self {
            transpose_a: transpose_rhs != rhs_layout.transposed,
            transpose_b: transpose_lhs != lhs_layout.transposed,
            m: cols,
            n: rows,
            k: inner,
            lda: rhs_layout.leading,
            ldb: lhs_layout.leading,
            ldc: cols,
        })
    }

    /// The row-major result's dims.
    pub fn output_dims(&self) -> [usize; 2] {
        [self.n, self.m]
    }
}

/// One `[b0, b1, rows, cols]` operand of a strided batched product as BLAS reads it in place:
/// whether its matrices are stored column-major (a transposed view of row-major storage), their
/// leading dimension, and the stride from one matrix to the next (the two batch axes folded
/// into one), all in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StridedOperand {
    pub transposed: bool,
    pub leading: usize,
    pub batch_stride: usize,
}

impl StridedOperand {
    /// The layout of a matrix of these dims and strides, or `None` when BLAS cannot read it in
    /// place (neither axis has a unit stride).
    pub fn of_matrix(
        [rows, cols]: [usize; 2],
        [row_stride, col_stride]: [usize; 2],
    ) -> Option<Self> {
        Self::of([1, 1, rows, cols], [0, 0, row_stride, col_stride])
    }

    /// The layout of a tensor of this shape and these strides, or `None` when BLAS cannot read
    /// it in place: its batch axes fold into no single stride, or neither matrix axis has a
    /// unit stride.
    pub fn of([b0, b1, rows, cols]: [usize; 4], strides: [usize; 4]) -> Option<Self> {
        let batch_stride = if b1 == 1 {
            strides[0]
        } else if b0 == 1 || strides[0] == b1 * strides[1] {
            strides[1]
        } else {
            return None;
        };
        let (transposed, leading) = if strides[3] == 1 && (rows == 1 || strides[2] >= cols) {
            (false, if rows == 1 { cols } else { strides[2] })
        } else if strides[2] == 1 && (cols == 1 || strides[3] >= rows) {
            (true, if cols == 1 { rows } else { strides[3] })
        } else {
            return None;
        };
        Some(Self {
            transposed,
            leading: leading.max(1),
            batch_stride,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAS's `C = op(A)·op(B)` by definition, on column-major buffers.
    fn column_major_gemm(call: &ColumnMajorGemm, a: &[f32], b: &[f32]) -> Vec<f32> {
        let a_at = |row: usize, col: usize| {
            if call.transpose_a {
                a[row * call.lda + col]
            } else {
                a[col * call.lda + row]
            }
        };
        let b_at = |row: usize, col: usize| {
            if call.transpose_b {
                b[row * call.ldb + col]
            } else {
                b[col * call.ldb + row]
            }
        };
        let mut c = vec![0.0; call.ldc * call.n];
        for col in 0..call.n {
            for row in 0..call.m {
                c[col * call.ldc + row] = (0..call.k).map(|i| a_at(row, i) * b_at(i, col)).sum();
            }
        }
        c
    }

    /// `op(L)·op(R)` on row-major buffers, the plain way.
    fn row_major_product(
        lhs: (&[f32], [usize; 2], bool),
        rhs: (&[f32], [usize; 2], bool),
    ) -> Vec<f32> {
        let at = |(data, [_, cols], transposed): (&[f32], [usize; 2], bool), r: usize, c: usize| {
            if transposed {
                data[c * cols + r]
            } else {
                data[r * cols + c]
            }
        };
        let rows = if lhs.2 { lhs.1[1] } else { lhs.1[0] };
        let inner = if lhs.2 { lhs.1[0] } else { lhs.1[1] };
        let cols = if rhs.2 { rhs.1[0] } else { rhs.1[1] };
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                out.push((0..inner).map(|i| at(lhs, r, i) * at(rhs, i, c)).sum());
            }
        }
        out
    }

    /// The layout of a contiguous row-major matrix of these dims.
    fn contiguous(dims: [usize; 2]) -> StridedOperand {
        StridedOperand::of_matrix(dims, [dims[1], 1]).expect("a contiguous matrix")
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7 + seed * 13) % 11) as f32 - 5.0)
            .collect()
    }

    #[test]
    fn every_transpose_combination_computes_the_row_major_product() {
        // The three products of a frozen projection: y = x·Wᵀ, dx = dy·W and dW = dyᵀ·x, with
        // n = 5 rows, 3 inputs and 4 outputs; and the fourth combination, Lᵀ·Rᵀ.
        let cases = [
            ([5, 3], false, [4, 3], true),
            ([5, 4], false, [4, 3], false),
            ([5, 4], true, [5, 3], false),
            ([3, 5], true, [4, 3], true),
        ];
        for (lhs_dims, lhs_t, rhs_dims, rhs_t) in cases {
            let lhs = values(lhs_dims[0] * lhs_dims[1], 1);
            let rhs = values(rhs_dims[0] * rhs_dims[1], 2);
            let call = ColumnMajorGemm::for_row_major(
                (lhs_dims, lhs_t, contiguous(lhs_dims)),
                (rhs_dims, rhs_t, contiguous(rhs_dims)),
            )
            .expect("inner dimensions agree");
            let expected = row_major_product((&lhs, lhs_dims, lhs_t), (&rhs, rhs_dims, rhs_t));
            assert_eq!(call.output_dims().iter().product::<usize>(), expected.len());
            // BLAS gets R's buffer first and L's second, each as it is.
            assert_eq!(column_major_gemm(&call, &rhs, &lhs), expected, "{call:?}");
        }
    }

    /// Every element of a strided tensor is where its layout says, and the leading dimension
    /// covers a stored column (BLAS's requirement), for the layouts the attention's products
    /// take: contiguous, a transposed view, a narrowed one, a single row, and folded batches.
    #[test]
    fn a_strided_operand_addresses_every_element_where_its_strides_do() {
        let cases = [
            ([2, 3, 70, 40], [8400, 2800, 40, 1], false),
            ([2, 3, 40, 70], [8400, 2800, 1, 40], true),
            ([2, 3, 50, 40], [8400, 2800, 40, 1], false),
            ([2, 3, 40, 50], [8400, 2800, 1, 40], true),
            ([1, 4, 1, 8], [32, 8, 0, 1], false),
            ([1, 3, 70, 40], [9999, 2800, 40, 1], false),
            ([2, 1, 70, 40], [2800, 7, 40, 1], false),
        ];
        for (shape, strides, transposed) in cases {
            let layout = StridedOperand::of(shape, strides).expect("read in place");
            assert_eq!(layout.transposed, transposed, "{shape:?} {strides:?}");
            let [b0, b1, rows, cols] = shape;
            let stored_rows = if transposed { rows } else { cols };
            assert!(layout.leading >= stored_rows, "{shape:?} {strides:?}");
            for (a, b, i, j) in (0..b0).flat_map(|a| {
                (0..b1).flat_map(move |b| {
                    (0..rows).flat_map(move |i| (0..cols).map(move |j| (a, b, i, j)))
                })
            }) {
                let by_strides = a * strides[0] + b * strides[1] + i * strides[2] + j * strides[3];
                let matrix = if transposed {
                    j * layout.leading + i
                } else {
                    i * layout.leading + j
                };
                let by_layout = (a * b1 + b) * layout.batch_stride + matrix;
                assert_eq!(
                    by_layout, by_strides,
                    "{shape:?} {strides:?} at {a} {b} {i} {j}"
                );
            }
        }
    }

    #[test]
    fn heads_major_views_of_position_major_storage_are_not_read_in_place() {
        // [batch 2, seq 70, heads 3, dim 40] storage viewed as [2, 3, 70, 40]: the head axis
        // strides less than a matrix, so the batch axes fold into no single stride.
        assert_eq!(StridedOperand::of([2, 3, 70, 40], [8400, 40, 120, 1]), None);
        // Neither matrix axis with a unit stride.
        assert_eq!(StridedOperand::of([1, 1, 4, 4], [32, 32, 8, 2]), None);
    }

    /// Operands read in place: `x` `[5, 3]` with its rows padded to 8 values (burn's pitched CUDA
    /// layout), and `W` `[4, 3]` as a transposed view of a contiguous `[3, 4]` buffer, in the
    /// frozen projection's products `x·Wᵀ` and `x·W` (then `W` is `[3, 4]` viewed from `[4, 3]`).
    #[test]
    fn padded_rows_and_transposed_views_are_read_in_place() {
        let x_buffer = values(5 * 8, 1);
        let x: Vec<f32> = (0..5)
            .flat_map(|r| x_buffer[r * 8..r * 8 + 3].to_vec())
            .collect();
        let x_layout = StridedOperand::of_matrix([5, 3], [8, 1]).expect("padded rows");
        assert_eq!((x_layout.transposed, x_layout.leading), (false, 8));
        for (w_dims, w_t) in [([4, 3], true), ([3, 4], false)] {
            // The view's storage is its transpose, contiguous.
            let [w_rows, w_cols] = w_dims;
            let w_buffer = values(w_rows * w_cols, 2);
            let w: Vec<f32> = (0..w_rows)
                .flat_map(|r| (0..w_cols).map(move |c| (r, c)))
                .map(|(r, c)| w_buffer[c * w_rows + r])
                .collect();
            let w_layout = StridedOperand::of_matrix(w_dims, [1, w_rows]).expect("a view");
            assert_eq!((w_layout.transposed, w_layout.leading), (true, w_rows));
            let call =
                ColumnMajorGemm::for_row_major(([5, 3], false, x_layout), (w_dims, w_t, w_layout))
                    .expect("inner dimensions agree");
            let expected = row_major_product((&x, [5, 3], false), (&w, w_dims, w_t));
            assert_eq!(
                column_major_gemm(&call, &w_buffer, &x_buffer),
                expected,
                "{call:?}"
            );
        }
    }

    #[test]
    fn mismatched_inner_dimensions_have_no_call() {
        assert_eq!(
            ColumnMajorGemm::for_row_major(
                ([5, 3], false, contiguous([5, 3])),
                ([4, 2], true, contiguous([4, 2]))
            ),
            None
        );
    }
}
