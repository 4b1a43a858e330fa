//! Adapter modules for burnish. This crate owns the adaptable linear layer that every model
//! projection is built from, so adapters plug into a model without a second copy of its code.
//! It knows nothing of any particular model architecture.

mod linear;

pub use linear::AdaptableLinear;
