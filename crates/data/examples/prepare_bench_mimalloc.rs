//! `prepare_bench` with mimalloc as the global allocator: tokenization allocates a string per
//! token, and glibc's malloc is then a large share of the time.
//!
//! ```sh
//! cargo run --release -p burnish-data --example prepare_bench_mimalloc -- OUT_DIR [ROWS]
//! ```

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "prepare_bench.rs"]
mod bench;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    bench::main()
}
