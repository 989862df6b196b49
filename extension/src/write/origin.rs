//! Which client mutation the statements running now belong to, so capture can
//! record `client_id` / `mutation_id` with the changes they make.

use std::cell::RefCell;

thread_local! {
    static CURRENT: RefCell<Option<(String, i64)>> = const { RefCell::new(None) };
}

/// The mutation being applied, if any.
pub fn current() -> Option<(String, i64)> {
    CURRENT.with(|current| current.borrow().clone())
}

/// Marks the statements run until the guard drops (also on error unwinding) as
/// made for `(client_id, mutation_id)`.
pub struct OriginGuard {
    previous: Option<(String, i64)>,
}

impl OriginGuard {
    pub fn set(origin: Option<(String, i64)>) -> Self {
        let previous = CURRENT.with(|current| current.replace(origin));
        OriginGuard { previous }
    }
}

impl Drop for OriginGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|current| *current.borrow_mut() = previous);
    }
}
