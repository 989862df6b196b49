//! Raising errors with livesync's own SQLSTATEs (`LSnnn`) from C-interface entry
//! points.
//!
//! An error passing through pgrx keeps its SQLSTATE only if pgrx knows the code, and
//! livesync's own codes are not among them. So the entry points do their work under
//! pgrx's guard, get an error to report back as plain data, and raise it from their
//! own frame, which owns nothing that needs dropping.

use crate::error::SqlState;
use pgrx::pg_sys;
use std::ffi::{c_char, c_int};

/// What a guarded body hands back to its unguarded C function: the result, or an
/// error to raise.
#[repr(C)]
pub struct Outcome {
    result: pg_sys::Datum,
    /// Palloc'd; null when the body succeeded.
    error: *mut ErrorToRaise,
}

impl Outcome {
    pub fn done(result: pg_sys::Datum) -> Outcome {
        Outcome {
            result,
            error: std::ptr::null_mut(),
        }
    }

    pub fn failed(error: *mut ErrorToRaise) -> Outcome {
        Outcome {
            result: pg_sys::Datum::from(0usize),
            error,
        }
    }

    /// The result, or the error raised; does not return then.
    ///
    /// # Safety
    /// Call only from a frame that owns nothing needing a drop, outside pgrx's
    /// guard (the error unwinds by longjmp).
    pub unsafe fn finish(self) -> pg_sys::Datum {
        if !self.error.is_null() {
            // SAFETY: a non-null error is a complete palloc'd ErrorToRaise that
            // outlives the guarded call; the frame is the caller's promise.
            unsafe { raise(&*self.error) };
        }
        self.result
    }
}

/// An error to raise, in memory that outlives the guarded call (palloc'd).
#[repr(C)]
pub struct ErrorToRaise {
    pub sqlstate: i32,
    pub message: *mut c_char,
    /// Null when there is no hint.
    pub hint: *mut c_char,
}

impl ErrorToRaise {
    /// A palloc'd copy of a registry error.
    pub fn of(error: &crate::error::LivesyncError) -> *mut ErrorToRaise {
        ErrorToRaise::palloc(error.sqlstate(), &error.to_string(), error.hint())
    }

    /// A palloc'd error.
    pub fn palloc(sqlstate: SqlState, message: &str, hint: Option<&str>) -> *mut ErrorToRaise {
        // SAFETY: the allocation is sized and (palloc: MAXALIGN) aligned for one
        // ErrorToRaise, written whole before the pointer is returned.
        unsafe {
            let error = pg_sys::palloc(std::mem::size_of::<ErrorToRaise>()).cast::<ErrorToRaise>();
            error.write(ErrorToRaise {
                sqlstate: sqlstate.encoded(),
                message: palloc_cstring(message),
                hint: hint.map_or(std::ptr::null_mut(), palloc_cstring),
            });
            error
        }
    }
}

unsafe extern "C-unwind" {
    // elog.h's reporting calls; pgrx does not expose them. Called only from
    // `raise`, in a frame pgrx does not guard.
    fn errstart(elevel: c_int, domain: *const c_char) -> bool;
    fn errcode(sqlerrcode: c_int) -> c_int;
    fn errmsg(fmt: *const c_char, ...) -> c_int;
    fn errhint(fmt: *const c_char, ...) -> c_int;
    fn errfinish(filename: *const c_char, lineno: c_int, funcname: *const c_char);
}

/// Raises an ERROR with the given SQLSTATE; does not return. Call it only from a
/// frame that owns nothing needing a drop (the error unwinds by longjmp).
///
/// # Safety
/// Every frame between this call and the nearest Postgres error handler must own
/// nothing that needs a drop; `error`'s strings must be NUL-terminated.
pub unsafe fn raise(error: &ErrorToRaise) -> ! {
    // SAFETY: the declarations above match elog.h; the strings are NUL-terminated
    // and passed through a "%s" format, and the longjmp errfinish makes skips only
    // frames that own nothing needing a drop (the caller's contract).
    unsafe {
        if errstart(pgrx::PgLogLevel::ERROR as c_int, std::ptr::null()) {
            errcode(error.sqlstate);
            errmsg(c"%s".as_ptr(), error.message);
            if !error.hint.is_null() {
                errhint(c"%s".as_ptr(), error.hint);
            }
            errfinish(c"raise.rs".as_ptr(), line!() as c_int, c"livesync".as_ptr());
        }
    }
    unreachable!("an ERROR does not return")
}

fn palloc_cstring(text: &str) -> *mut c_char {
    // SAFETY: the allocation has room for the bytes and the NUL written after them.
    unsafe {
        let copy = pg_sys::palloc(text.len() + 1).cast::<u8>();
        std::ptr::copy_nonoverlapping(text.as_ptr(), copy, text.len());
        *copy.add(text.len()) = 0;
        copy.cast()
    }
}
