//! Safe bindings to the system libnbd: one [`Handle`] per NBD connection.
//!
//! This module is the only place in blockrepl with `unsafe`. It owns the raw
//! `nbd_handle` pointer and every buffer libnbd may touch asynchronously: a buffer
//! handed to an `aio_*` call is moved into the handle and only given back once the
//! command is retired, and `Drop` closes the connection before freeing buffers, so
//! libnbd can never write into freed memory. It knows nothing of plans, retries or
//! progress; those live in the rest of `engine/`.

mod ffi;

use std::ffi::{CStr, CString, c_void};
use std::fmt;
use std::os::raw::{c_char, c_int};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An error reported by libnbd: its message and the errno it gave (0 when none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdError {
    pub message: String,
    pub errno: i32,
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.errno == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{} (errno {})", self.message, self.errno)
        }
    }
}

impl std::error::Error for NbdError {}

impl NbdError {
    /// Reads libnbd's thread-local error; call it right after the failing call.
    fn last() -> Self {
        // SAFETY: both functions only read thread-local state; the string is copied
        // before any other libnbd call can invalidate it.
        let (msg, errno) = unsafe { (ffi::nbd_get_error(), ffi::nbd_get_errno()) };
        let message = if msg.is_null() {
            "unknown libnbd error".to_owned()
        } else {
            // SAFETY: libnbd returns a NUL-terminated string valid until the next call.
            unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned()
        };
        Self { message, errno }
    }

    fn new(message: impl Into<String>, errno: i32) -> Self {
        Self { message: message.into(), errno }
    }

    /// True for failures that may succeed when tried again, possibly on a new
    /// connection: I/O errors, a dropped or reset connection, timeouts. A server
    /// that closes the connection (libnbd says so without an errno, e.g. an
    /// overloaded server during the handshake) is a dropped connection too.
    pub fn is_transient(&self) -> bool {
        (self.errno == 0 && self.message.contains("server disconnected unexpectedly"))
            || matches!(
                self.errno,
                libc::EIO
                    | libc::ENOTCONN
                    | libc::ESHUTDOWN
                    | libc::ECONNRESET
                    | libc::ECONNABORTED
                    | libc::ECONNREFUSED
                    | libc::EPIPE
                    | libc::ETIMEDOUT
                    | libc::EAGAIN
                    | libc::EINTR
            )
    }
}

/// How to open a connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions<'a> {
    /// Shown in libnbd's debug output and errors, e.g. `source` or `target`.
    pub name: &'a str,
    /// Meta contexts to negotiate, e.g. `base:allocation`.
    pub meta_contexts: &'a [String],
}

/// Which of the server's advertised block-size constraints to read.
#[derive(Debug, Clone, Copy)]
pub enum BlockSize {
    Minimum,
    Preferred,
    Maximum,
}

/// The buffer a finished command gives back, if it borrowed one.
#[derive(Debug)]
pub enum Returned {
    None,
    /// The buffer of an `aio_pread`, now filled.
    Read(Vec<u8>),
    /// Nothing: a write's shared buffer is simply released.
    Write,
    /// The reply chunks of an `aio_block_status`.
    Extents(Vec<ExtentReply>),
}

/// One reply chunk of a block-status query: the entries of one meta context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentReply {
    pub context: String,
    pub offset: u64,
    /// (length, flags) pairs.
    pub entries: Vec<u32>,
}

/// A retired asynchronous command.
#[derive(Debug)]
pub struct Completion {
    pub cookie: u64,
    pub result: Result<(), NbdError>,
    pub buffer: Returned,
}

enum Pinned {
    None,
    Read(Vec<u8>),
    Write(#[allow(dead_code)] Arc<Vec<u8>>),
    /// Where the extent callback of an `aio_block_status` collects its replies.
    Extents(Box<Mutex<Vec<ExtentReply>>>),
}

/// One connection to an NBD server.
///
/// Synchronous calls block the calling thread; asynchronous calls (`aio_*`) return a
/// cookie and are driven by [`poll`] and collected with [`Handle::next_completed`].
pub struct Handle {
    ptr: NonNull<ffi::nbd_handle>,
    /// Buffers of commands in flight, keyed by cookie. Dropped only after `nbd_close`.
    in_flight: Vec<(u64, Pinned)>,
    /// Dropping disconnects politely (see [`Handle::abort`]).
    polite: bool,
}

// SAFETY: libnbd handles are thread-safe (every call takes the handle's lock); the
// Rust-side state is plain owned data.
unsafe impl Send for Handle {}

fn check(rc: c_int) -> Result<c_int, NbdError> {
    if rc == -1 { Err(NbdError::last()) } else { Ok(rc) }
}

fn cstring(what: &str, s: &str) -> Result<CString, NbdError> {
    CString::new(s).map_err(|_| NbdError::new(format!("{what} contains a NUL byte"), libc::EINVAL))
}

impl Handle {
    /// Connects to `uri` (`nbd://`, `nbd+unix://`, `nbds://`, `nbds+unix://`),
    /// negotiating the requested meta contexts. Gives up after `timeout`, or as soon
    /// as `stop` returns true (checked every 100 ms), so a dead network can neither
    /// hang a copy nor delay its cancellation.
    pub fn connect(
        uri: &str,
        opts: &ConnectOptions<'_>,
        timeout: Duration,
        stop: &dyn Fn() -> bool,
    ) -> Result<Self, NbdError> {
        let c_uri = cstring("URI", uri)?;
        let c_name = cstring("handle name", opts.name)?;
        let contexts = opts.meta_contexts.iter().map(|c| cstring("meta context", c)).collect::<Result<Vec<_>, _>>()?;
        // SAFETY: nbd_create has no preconditions; NULL means failure.
        let ptr = NonNull::new(unsafe { ffi::nbd_create() }).ok_or_else(NbdError::last)?;
        let h = Self { ptr, in_flight: Vec::new(), polite: true };
        let p = h.ptr.as_ptr();
        // SAFETY: `p` is a live handle owned by `h`; the strings outlive the calls
        // (libnbd copies them).
        unsafe {
            check(ffi::nbd_set_handle_name(p, c_name.as_ptr()))?;
            // Our buffers are always initialised Rust memory, so libnbd need not
            // zero them before every read (a memset per request otherwise).
            check(ffi::nbd_set_pread_initialize(p, false))?;
            check(ffi::nbd_set_request_block_size(p, true))?;
            check(ffi::nbd_set_uri_allow_transports(
                p,
                ffi::LIBNBD_ALLOW_TRANSPORT_TCP | ffi::LIBNBD_ALLOW_TRANSPORT_UNIX,
            ))?;
            check(ffi::nbd_set_uri_allow_tls(p, ffi::LIBNBD_TLS_ALLOW))?;
            // Needed for `tls-psk-file=` in the URI; the URI comes from the operator.
            check(ffi::nbd_set_uri_allow_local_file(p, true))?;
            for c in &contexts {
                check(ffi::nbd_add_meta_context(p, c.as_ptr()))?;
            }
            check(ffi::nbd_aio_connect_uri(p, c_uri.as_ptr()))?;
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // SAFETY: live handle.
            if unsafe { ffi::nbd_aio_is_ready(p) } == 1 {
                return Ok(h);
            }
            if h.is_dead() {
                return Err(NbdError::new("connection closed during the NBD handshake", libc::ECONNRESET));
            }
            if stop() {
                return Err(NbdError::new("connection attempt cancelled", libc::ECANCELED));
            }
            if std::time::Instant::now() >= deadline {
                return Err(NbdError::new(format!("no NBD handshake within {} s", timeout.as_secs()), libc::ETIMEDOUT));
            }
            if let Some(e) = wait(&[&h], Duration::from_millis(100))? {
                return Err(e);
            }
        }
    }

    fn raw(&self) -> *mut ffi::nbd_handle {
        self.ptr.as_ptr()
    }

    fn flag(&self, f: unsafe extern "C" fn(*mut ffi::nbd_handle) -> c_int) -> Result<bool, NbdError> {
        // SAFETY: `f` is one of libnbd's `nbd_can_*`/`nbd_is_*` queries on a live handle.
        check(unsafe { f(self.raw()) }).map(|v| v != 0)
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> Result<u64, NbdError> {
        // SAFETY: live handle.
        let v = unsafe { ffi::nbd_get_size(self.raw()) };
        // libnbd 1.14 may return negative values other than -1 on error.
        if v < 0 { Err(NbdError::last()) } else { Ok(v as u64) }
    }

    pub fn is_read_only(&self) -> Result<bool, NbdError> {
        self.flag(ffi::nbd_is_read_only)
    }
    pub fn can_flush(&self) -> Result<bool, NbdError> {
        self.flag(ffi::nbd_can_flush)
    }
    pub fn can_zero(&self) -> Result<bool, NbdError> {
        self.flag(ffi::nbd_can_zero)
    }
    pub fn can_fast_zero(&self) -> Result<bool, NbdError> {
        self.flag(ffi::nbd_can_fast_zero)
    }
    pub fn can_multi_conn(&self) -> Result<bool, NbdError> {
        self.flag(ffi::nbd_can_multi_conn)
    }

    /// Whether the server agreed to the meta context `name`.
    pub fn can_meta_context(&self, name: &str) -> Result<bool, NbdError> {
        let c = cstring("meta context", name)?;
        // SAFETY: live handle, valid C string.
        check(unsafe { ffi::nbd_can_meta_context(self.raw(), c.as_ptr()) }).map(|v| v != 0)
    }

    /// A block-size constraint the server advertised, or 0 when it gave none.
    pub fn block_size(&self, kind: BlockSize) -> Result<u64, NbdError> {
        let k = match kind {
            BlockSize::Minimum => ffi::LIBNBD_SIZE_MINIMUM,
            BlockSize::Preferred => ffi::LIBNBD_SIZE_PREFERRED,
            BlockSize::Maximum => ffi::LIBNBD_SIZE_MAXIMUM,
        };
        // SAFETY: live handle.
        let v = unsafe { ffi::nbd_get_block_size(self.raw(), k) };
        if v < 0 { Err(NbdError::last()) } else { Ok(v as u64) }
    }

    /// Starts a block-status query over `[offset, offset+count)`; the reply chunks
    /// come back in the [`Completion`] as [`Returned::Extents`].
    pub fn aio_block_status(&mut self, count: u64, offset: u64) -> Result<u64, NbdError> {
        let sink: Box<Mutex<Vec<ExtentReply>>> = Box::default();
        let cb = ffi::nbd_extent_callback {
            callback: Some(collect_extents),
            user_data: (&*sink as *const Mutex<Vec<ExtentReply>>).cast_mut().cast::<c_void>(),
            free: None,
        };
        // SAFETY: the boxed sink does not move when the box is moved into
        // `in_flight`, and it stays there until libnbd has retired the command or
        // the handle is closed, so the callback's `user_data` outlives every call.
        let cookie =
            unsafe { ffi::nbd_aio_block_status(self.raw(), count, offset, cb, ffi::nbd_completion_callback::NULL, 0) };
        self.track(cookie, Pinned::Extents(sink))
    }

    /// Starts reading `len` bytes at `offset` into `buf` (which must hold at least
    /// `len` bytes). The buffer comes back in the [`Completion`], or with the error
    /// when the command could not be queued.
    pub fn aio_pread(&mut self, mut buf: Vec<u8>, len: usize, offset: u64) -> Result<u64, (NbdError, Vec<u8>)> {
        if len > buf.len() {
            return Err((NbdError::new("read larger than its buffer", libc::EINVAL), buf));
        }
        // SAFETY: the heap block of `buf` does not move when `buf` is moved into
        // `in_flight`, and it stays there until libnbd has retired the command or the
        // handle is closed.
        let cookie = unsafe {
            ffi::nbd_aio_pread(self.raw(), buf.as_mut_ptr().cast(), len, offset, ffi::nbd_completion_callback::NULL, 0)
        };
        if cookie < 0 {
            // Not queued: libnbd holds no pointer into `buf`.
            return Err((NbdError::last(), buf));
        }
        self.in_flight.push((cookie as u64, Pinned::Read(buf)));
        Ok(cookie as u64)
    }

    /// Starts writing `buf[range]` at `offset`. The handle keeps a reference to the
    /// buffer until the command is retired.
    pub fn aio_pwrite(
        &mut self,
        buf: &Arc<Vec<u8>>,
        range: std::ops::Range<usize>,
        offset: u64,
    ) -> Result<u64, NbdError> {
        let Some(slice) = buf.get(range) else {
            return Err(NbdError::new("write outside its buffer", libc::EINVAL));
        };
        // SAFETY: the clone of the Arc kept in `in_flight` keeps the bytes alive and
        // unmodified (no one can get `&mut` while a clone exists) until retirement.
        let cookie = unsafe {
            ffi::nbd_aio_pwrite(
                self.raw(),
                slice.as_ptr().cast(),
                slice.len(),
                offset,
                ffi::nbd_completion_callback::NULL,
                0,
            )
        };
        self.track(cookie, Pinned::Write(Arc::clone(buf)))
    }

    /// Starts a write-zeroes request; `fast` asks the server to fail rather than
    /// fall back to writing zeros slowly (NBD fast-zero); `keep_allocated` asks it
    /// not to punch a hole (NBD's NO_HOLE flag).
    pub fn aio_zero(&mut self, count: u64, offset: u64, fast: bool, keep_allocated: bool) -> Result<u64, NbdError> {
        let mut flags = if fast { ffi::LIBNBD_CMD_FLAG_FAST_ZERO } else { 0 };
        if keep_allocated {
            flags |= ffi::LIBNBD_CMD_FLAG_NO_HOLE;
        }
        // SAFETY: no buffer involved.
        let cookie = unsafe { ffi::nbd_aio_zero(self.raw(), count, offset, ffi::nbd_completion_callback::NULL, flags) };
        self.track(cookie, Pinned::None)
    }

    /// Starts a flush.
    pub fn aio_flush(&mut self) -> Result<u64, NbdError> {
        // SAFETY: no buffer involved.
        let cookie = unsafe { ffi::nbd_aio_flush(self.raw(), ffi::nbd_completion_callback::NULL, 0) };
        self.track(cookie, Pinned::None)
    }

    fn track(&mut self, cookie: i64, pinned: Pinned) -> Result<u64, NbdError> {
        if cookie < 0 {
            // The command was not queued, so libnbd holds no pointer into `pinned`.
            return Err(NbdError::last());
        }
        let cookie = cookie as u64;
        self.in_flight.push((cookie, pinned));
        Ok(cookie)
    }

    /// Number of commands issued and not yet retired.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Retires one completed command, if any.
    pub fn next_completed(&mut self) -> Option<Completion> {
        if self.in_flight.is_empty() {
            return None;
        }
        // SAFETY: live handle.
        let cookie = unsafe { ffi::nbd_aio_peek_command_completed(self.raw()) };
        if cookie <= 0 {
            return None;
        }
        let cookie = cookie as u64;
        // SAFETY: live handle; the cookie came from libnbd.
        let rc = unsafe { ffi::nbd_aio_command_completed(self.raw(), cookie) };
        let result = match rc {
            1 => Ok(()),
            -1 => Err(NbdError::last()),
            _ => return None,
        };
        let pos = self.in_flight.iter().position(|(c, _)| *c == cookie)?;
        let (_, pinned) = self.in_flight.swap_remove(pos);
        let buffer = match pinned {
            Pinned::None => Returned::None,
            Pinned::Read(b) => Returned::Read(b),
            Pinned::Write(_) => Returned::Write,
            Pinned::Extents(sink) => Returned::Extents(sink.into_inner().unwrap_or_else(|e| e.into_inner())),
        };
        Some(Completion { cookie, result, buffer })
    }

    /// True once the connection has failed; commands still in flight complete with
    /// errors and a new handle must be made.
    pub fn is_dead(&self) -> bool {
        // SAFETY: live handle.
        unsafe { ffi::nbd_aio_is_dead(self.raw()) == 1 || ffi::nbd_aio_is_closed(self.raw()) == 1 }
    }
}

impl Handle {
    /// Lets the commands in flight finish and disconnects politely, giving up at
    /// `deadline`. Cutting a server off mid-reply is rude, and some servers
    /// (nbdkit 1.32 among them) have been seen to abort when it happens.
    fn disconnect(&mut self, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        let before = |d| std::time::Instant::now() < d;
        while !self.in_flight.is_empty() && !self.is_dead() && before(deadline) {
            if wait(&[&*self], Duration::from_millis(50)).is_err() {
                return;
            }
            while self.next_completed().is_some() {}
        }
        if self.is_dead() {
            return;
        }
        // SAFETY: live handle.
        if unsafe { ffi::nbd_aio_disconnect(self.raw(), 0) } == -1 {
            return;
        }
        while !self.is_dead() && before(deadline) {
            if wait(&[&*self], Duration::from_millis(50)).is_err() {
                return;
            }
        }
    }
}

impl Handle {
    /// Closes the connection at once: the socket is shut down and the handle
    /// closed without waiting for the commands in flight and without the polite
    /// NBD disconnect, so nothing more is sent, not even the rest of a request
    /// that was partly sent (the server drops a request it did not fully
    /// receive). Bytes already handed to the kernel still leave.
    pub fn abort(mut self) {
        // SAFETY: live handle; the fd stays libnbd's, we only shut it down.
        let fd = unsafe { ffi::nbd_aio_get_fd(self.raw()) };
        if fd >= 0 {
            // SAFETY: shutting down a socket the handle owns; libnbd notices a dead
            // connection and closes the fd itself in nbd_close.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        self.polite = false;
    }
}

/// How long dropping a handle may wait for a polite disconnect.
const DISCONNECT_GRACE: Duration = Duration::from_millis(500);

impl Drop for Handle {
    fn drop(&mut self) {
        if self.polite {
            self.disconnect(DISCONNECT_GRACE);
        }
        // SAFETY: the pointer came from nbd_create and is closed exactly once. After
        // nbd_close returns libnbd no longer touches any buffer, and only then are the
        // buffers in `in_flight` dropped (fields drop after this body).
        unsafe { ffi::nbd_close(self.raw()) };
    }
}

unsafe extern "C" fn collect_extents(
    user_data: *mut c_void,
    metacontext: *const c_char,
    offset: u64,
    entries: *mut u32,
    nr_entries: usize,
    error: *mut c_int,
) -> c_int {
    let run = || {
        // SAFETY: `user_data` is the boxed sink of `aio_block_status`, alive until the
        // command is retired; libnbd passes a valid context string and `nr_entries`
        // valid u32s.
        let sink = unsafe { &*user_data.cast::<Mutex<Vec<ExtentReply>>>() };
        let context = unsafe { CStr::from_ptr(metacontext) }.to_string_lossy().into_owned();
        let ents: &[u32] =
            if entries.is_null() { &[] } else { unsafe { std::slice::from_raw_parts(entries, nr_entries) } };
        let mut replies = sink.lock().unwrap_or_else(|e| e.into_inner());
        replies.push(ExtentReply { context, offset, entries: ents.to_vec() });
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(()) => 0,
        Err(_) => {
            if !error.is_null() {
                // SAFETY: libnbd passes a valid pointer for the error out-parameter.
                unsafe { *error = libc::EIO };
            }
            -1
        }
    }
}

/// Waits until any of `handles` can make progress (or `timeout` passes) and lets
/// libnbd do the pending socket work. A handle whose socket work fails is marked
/// dead by libnbd; callers see that through failed commands and `is_dead`.
pub fn poll(handles: &mut [&mut Handle], timeout: Duration) -> Result<(), NbdError> {
    poll_unless(handles, timeout, &|| false)
}

/// [`poll`], except that when `halt` says so once the wait is over, no socket
/// work is done at all: libnbd sends the rest of a queued or partly sent request
/// only from that work, so a caller whose right to write may have lapsed while
/// it waited (or while the process was paused) checks that right here.
pub fn poll_unless(handles: &mut [&mut Handle], timeout: Duration, halt: &dyn Fn() -> bool) -> Result<(), NbdError> {
    let refs: Vec<&Handle> = handles.iter().map(|h| &**h).collect();
    wait_unless(&refs, timeout, halt).map(drop)
}

/// `poll`'s engine; also returns the first error libnbd reported while doing the
/// socket work, which the handshake needs to explain a failed connection.
fn wait(handles: &[&Handle], timeout: Duration) -> Result<Option<NbdError>, NbdError> {
    wait_unless(handles, timeout, &|| false)
}

fn wait_unless(handles: &[&Handle], timeout: Duration, halt: &dyn Fn() -> bool) -> Result<Option<NbdError>, NbdError> {
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(handles.len());
    let mut owners = Vec::with_capacity(handles.len());
    for (i, h) in handles.iter().enumerate() {
        // SAFETY: live handle.
        let fd = unsafe { ffi::nbd_aio_get_fd(h.raw()) };
        if fd < 0 {
            continue;
        }
        // SAFETY: live handle.
        let dir = unsafe { ffi::nbd_aio_get_direction(h.raw()) };
        let mut events = 0;
        if dir & ffi::LIBNBD_AIO_DIRECTION_READ != 0 {
            events |= libc::POLLIN;
        }
        if dir & ffi::LIBNBD_AIO_DIRECTION_WRITE != 0 {
            events |= libc::POLLOUT;
        }
        fds.push(libc::pollfd { fd, events, revents: 0 });
        owners.push(i);
    }
    if fds.is_empty() {
        std::thread::sleep(timeout.min(Duration::from_millis(10)));
        return Ok(None);
    }
    let ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if errno == libc::EINTR {
            return Ok(None);
        }
        return Err(NbdError::new("poll failed", errno));
    }
    let mut first_err = None;
    for (pfd, &i) in fds.iter().zip(&owners) {
        // Asked again before each connection's work, not once for all: the
        // process may be paused while an earlier connection's replies are being
        // read, and the right to write may have lapsed by the time it goes on.
        if halt() {
            return Ok(first_err);
        }
        let h = handles[i];
        let mut rc = 0;
        if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            // SAFETY: live handle.
            rc = unsafe { ffi::nbd_aio_notify_read(h.raw()) };
        }
        if rc == 0 && pfd.revents & libc::POLLOUT != 0 {
            // SAFETY: live handle.
            rc = unsafe { ffi::nbd_aio_notify_write(h.raw()) };
        }
        if rc == -1 && first_err.is_none() {
            first_err = Some(NbdError::last());
        }
    }
    Ok(first_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::harness::{Server, tempdir};

    fn handle(server: &Server) -> Handle {
        let opts = ConnectOptions { name: "test", meta_contexts: &[] };
        Handle::connect(&server.uri(), &opts, Duration::from_secs(10), &|| false).unwrap()
    }

    /// Waits (poll(2) only, no socket work) until `h` has something to read.
    fn readable(h: &Handle) {
        // SAFETY: live handle.
        let fd = unsafe { ffi::nbd_aio_get_fd(h.raw()) };
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, 10_000) };
        assert!(rc == 1 && p.revents & libc::POLLIN != 0, "no reply within 10 s");
    }

    /// Found by the chaos suite: a daemon SIGSTOPped while it read a source's
    /// replies went on, once continued, to send the rest of a write to a
    /// target it no longer had the right to write to. The halt condition was
    /// asked once after poll(2), before every connection's work; it is now
    /// asked before each one's.
    #[test]
    fn a_halt_that_comes_while_one_connection_is_served_spares_the_next() {
        let d = tempdir();
        let server = Server::nbdkit(d.path(), "mem", &["memory", "size=1M"]);
        let (mut first, mut second) = (handle(&server), handle(&server));
        first.aio_pread(vec![0; 4096], 4096, 0).unwrap();
        second.aio_pread(vec![0; 4096], 4096, 0).unwrap();
        readable(&first);
        readable(&second);
        // The right lapses while the first connection's reply is read.
        let asked = std::cell::Cell::new(0);
        let halt = || {
            asked.set(asked.get() + 1);
            asked.get() > 1
        };
        poll_unless(&mut [&mut first, &mut second], Duration::from_secs(1), &halt).unwrap();
        assert!(first.next_completed().is_some(), "the first connection was not served");
        assert!(second.next_completed().is_none(), "the second connection was served after the halt");
        assert_eq!(second.in_flight(), 1);
    }
}
