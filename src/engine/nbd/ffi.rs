//! Raw declarations of the part of the libnbd 1.14 C API that blockrepl uses,
//! written by hand against `/usr/include/libnbd.h`. Nothing outside
//! `engine::nbd` may use these; `Handle` is the safe face.
//!
//! Why by hand (checked 2026-12): the crate registry has no `libnbd` or
//! `libnbd-sys` crate; libnbd's own Rust bindings live in its source tree only
//! from 1.18 on and need that library, while Debian 12 ships 1.14; the `nbd`
//! crate (0.3) is a pure-Rust client without structured replies, block status
//! (`base:allocation`, dirty bitmaps), TLS or the asynchronous API the copy loop
//! is built on. Generating these with bindgen would add libclang to the build
//! for some thirty declarations. Revisit when the target distribution ships a
//! libnbd with maintained bindings.

#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_uint, c_void, size_t};

/// Opaque libnbd handle.
#[repr(C)]
pub struct nbd_handle {
    _private: [u8; 0],
}

#[repr(C)]
pub struct nbd_completion_callback {
    pub callback: Option<unsafe extern "C" fn(user_data: *mut c_void, error: *mut c_int) -> c_int>,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
}

impl nbd_completion_callback {
    /// `NBD_NULL_COMPLETION`: the command is retired with `nbd_aio_command_completed`.
    pub const NULL: Self = Self { callback: None, user_data: std::ptr::null_mut(), free: None };
}

#[repr(C)]
pub struct nbd_extent_callback {
    pub callback: Option<
        unsafe extern "C" fn(
            user_data: *mut c_void,
            metacontext: *const c_char,
            offset: u64,
            entries: *mut u32,
            nr_entries: size_t,
            error: *mut c_int,
        ) -> c_int,
    >,
    pub user_data: *mut c_void,
    pub free: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
}

pub const LIBNBD_SIZE_MINIMUM: c_int = 0;
pub const LIBNBD_SIZE_PREFERRED: c_int = 1;
pub const LIBNBD_SIZE_MAXIMUM: c_int = 2;

pub const LIBNBD_CMD_FLAG_NO_HOLE: u32 = 0x02;
pub const LIBNBD_CMD_FLAG_FAST_ZERO: u32 = 0x10;

pub const LIBNBD_AIO_DIRECTION_READ: c_uint = 1;
pub const LIBNBD_AIO_DIRECTION_WRITE: c_uint = 2;

pub const LIBNBD_ALLOW_TRANSPORT_TCP: u32 = 0x01;
pub const LIBNBD_ALLOW_TRANSPORT_UNIX: u32 = 0x02;

pub const LIBNBD_TLS_ALLOW: c_int = 1;

#[link(name = "nbd")]
unsafe extern "C" {
    pub fn nbd_create() -> *mut nbd_handle;
    pub fn nbd_close(h: *mut nbd_handle);
    pub fn nbd_get_error() -> *const c_char;
    pub fn nbd_get_errno() -> c_int;

    pub fn nbd_set_handle_name(h: *mut nbd_handle, name: *const c_char) -> c_int;
    pub fn nbd_set_pread_initialize(h: *mut nbd_handle, request: bool) -> c_int;
    pub fn nbd_set_request_block_size(h: *mut nbd_handle, request: bool) -> c_int;
    pub fn nbd_add_meta_context(h: *mut nbd_handle, name: *const c_char) -> c_int;
    pub fn nbd_set_uri_allow_transports(h: *mut nbd_handle, mask: u32) -> c_int;
    pub fn nbd_set_uri_allow_tls(h: *mut nbd_handle, tls: c_int) -> c_int;
    pub fn nbd_set_uri_allow_local_file(h: *mut nbd_handle, allow: bool) -> c_int;
    pub fn nbd_aio_connect_uri(h: *mut nbd_handle, uri: *const c_char) -> c_int;
    pub fn nbd_aio_is_ready(h: *mut nbd_handle) -> c_int;

    pub fn nbd_is_read_only(h: *mut nbd_handle) -> c_int;
    pub fn nbd_can_flush(h: *mut nbd_handle) -> c_int;
    pub fn nbd_can_zero(h: *mut nbd_handle) -> c_int;
    pub fn nbd_can_fast_zero(h: *mut nbd_handle) -> c_int;
    pub fn nbd_can_multi_conn(h: *mut nbd_handle) -> c_int;
    pub fn nbd_can_meta_context(h: *mut nbd_handle, name: *const c_char) -> c_int;
    pub fn nbd_get_size(h: *mut nbd_handle) -> i64;
    pub fn nbd_get_block_size(h: *mut nbd_handle, size_type: c_int) -> i64;

    pub fn nbd_aio_block_status(
        h: *mut nbd_handle,
        count: u64,
        offset: u64,
        extent_callback: nbd_extent_callback,
        completion_callback: nbd_completion_callback,
        flags: u32,
    ) -> i64;

    pub fn nbd_aio_pread(
        h: *mut nbd_handle,
        buf: *mut c_void,
        count: size_t,
        offset: u64,
        completion_callback: nbd_completion_callback,
        flags: u32,
    ) -> i64;
    pub fn nbd_aio_pwrite(
        h: *mut nbd_handle,
        buf: *const c_void,
        count: size_t,
        offset: u64,
        completion_callback: nbd_completion_callback,
        flags: u32,
    ) -> i64;
    pub fn nbd_aio_zero(
        h: *mut nbd_handle,
        count: u64,
        offset: u64,
        completion_callback: nbd_completion_callback,
        flags: u32,
    ) -> i64;
    pub fn nbd_aio_flush(h: *mut nbd_handle, completion_callback: nbd_completion_callback, flags: u32) -> i64;

    pub fn nbd_aio_disconnect(h: *mut nbd_handle, flags: u32) -> c_int;
    pub fn nbd_aio_get_fd(h: *mut nbd_handle) -> c_int;
    pub fn nbd_aio_get_direction(h: *mut nbd_handle) -> c_uint;
    pub fn nbd_aio_notify_read(h: *mut nbd_handle) -> c_int;
    pub fn nbd_aio_notify_write(h: *mut nbd_handle) -> c_int;
    pub fn nbd_aio_is_dead(h: *mut nbd_handle) -> c_int;
    pub fn nbd_aio_is_closed(h: *mut nbd_handle) -> c_int;
    pub fn nbd_aio_command_completed(h: *mut nbd_handle, cookie: u64) -> c_int;
    pub fn nbd_aio_peek_command_completed(h: *mut nbd_handle) -> i64;
}
