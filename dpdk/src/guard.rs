//! No panic crosses into C: every function C calls (the exports, the bus operations, the
//! interrupt callbacks) runs its body through [`ffi`], which turns a panic into DPDK's
//! error value for that call and a log line naming the call.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::log;

fn panic_text(p: &(dyn Any + Send)) -> &str {
    if let Some(s) = p.downcast_ref::<&str>() {
        s
    } else if let Some(s) = p.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// Runs `f`; on a panic logs "`call`: internal error ..." and returns `on_panic`.
pub fn ffi<R>(call: &str, on_panic: R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            log::error(&format!(
                "{call}: internal error in pcibus (panic: {}); returning an error",
                panic_text(p.as_ref())
            ));
            on_panic
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_the_error_value() {
        assert_eq!(ffi("test", -1, || 5), 5);
        // The default hook prints the panic (the hook is process-wide: not replaced here, so
        // other tests' panics keep their messages).
        assert_eq!(ffi("test", -1, || -> i32 { panic!("boom") }), -1);
    }
}
