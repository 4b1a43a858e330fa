//! Spelling a row-major matrix product as a column-major BLAS call (cuBLAS is column-major;
//! burn's tensors are row-major).
//!
//! A row-major `[r, c]` buffer read column-major is its `[c, r]` transpose, so the row-major
//! `C = op(L)·op(R)` is computed as the column-major `Cᵀ = op(R)ᵀ·op(L)ᵀ`: each operand's buffer
//! is passed as it is, `R`'s as BLAS's first operand, and each transpose flag carries over.

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
    /// The call computing the row-major `[rows, cols]` result of `op(lhs)·op(rhs)` for
    /// contiguous row-major operands of the given dims, `op` transposing where its flag is set;
    /// `None` when the inner dimensions differ.
    pub fn for_row_major(
        lhs: [usize; 2],
        transpose_lhs: bool,
        rhs: [usize; 2],
        transpose_rhs: bool,
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
        (inner == rhs_inner).then_some(Self {
            transpose_a: transpose_rhs,
            transpose_b: transpose_lhs,
            m: cols,
            n: rows,
            k: inner,
            lda: rhs_cols,
            ldb: lhs_cols,
            ldc: cols,
        })
    }

    /// The row-major result's dims.
    pub fn output_dims(&self) -> [usize; 2] {
        [self.n, self.m]
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
            let call = ColumnMajorGemm::for_row_major(lhs_dims, lhs_t, rhs_dims, rhs_t)
                .expect("inner dimensions agree");
            let expected = row_major_product((&lhs, lhs_dims, lhs_t), (&rhs, rhs_dims, rhs_t));
            assert_eq!(call.output_dims().iter().product::<usize>(), expected.len());
            // BLAS gets R's buffer first and L's second, each as it is.
            assert_eq!(column_major_gemm(&call, &rhs, &lhs), expected, "{call:?}");
        }
    }

    #[test]
    fn mismatched_inner_dimensions_have_no_call() {
        assert_eq!(
            ColumnMajorGemm::for_row_major([5, 3], false, [4, 2], true),
            None
        );
    }
}
