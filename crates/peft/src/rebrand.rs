//! Moving a value between two spellings of one type: generic code that has checked with
//! `TypeId` that its backend `B` is a concrete backend (to run a kernel of that backend's own)
//! hands its tensors over with [`rebrand`], which cannot fail after that check.

use std::any::Any;

/// `value` as `To`, which must be `From` under another name.
///
/// # Panics
/// If `From` and `To` are different types: a caller that did not check `TypeId` first.
pub fn rebrand<From: 'static, To: 'static>(value: From) -> To {
    match (Box::new(value) as Box<dyn Any>).downcast::<To>() {
        Ok(value) => *value,
        Err(_) => unreachable!("rebrand is called only between one type's two spellings"),
    }
}
