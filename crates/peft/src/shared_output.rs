//! An output matrix that the tasks of one parallel product write at once, each its own block:
//! a raw pointer the thread pool may share, since no two tasks touch the same element and the
//! product waits for all of them before the buffer is used.

/// A row-major `f32` output with `stride` columns, shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
pub(crate) struct SharedOutput {
    start: *mut f32,
    stride: usize,
}

// SAFETY: the tasks sharing it write disjoint elements, and the buffer outlives them (the
// product that made it waits for them).
unsafe impl Send for SharedOutput {}
// SAFETY: as above.
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// The output in `buffer`, which has room for its rows of `stride` columns (capacity is
    /// enough: tasks write elements before anything reads them).
    pub(crate) fn new(buffer: &mut Vec<f32>, stride: usize) -> Self {
        Self {
            start: buffer.as_mut_ptr(),
            stride,
        }
    }

    /// Where element `(row, col)` is.
    pub(crate) fn at(self, row: usize, col: usize) -> *mut f32 {
        debug_assert!(col < self.stride);
        // SAFETY: callers name elements inside the output.
        unsafe { self.start.add(row * self.stride + col) }
    }
}
