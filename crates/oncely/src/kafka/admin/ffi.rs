//! The unsafe edge of [`super`]: owned librdkafka handles, one request's
//! private reply queue, and readers that copy result memory (borrowed from the
//! result event) into Rust values before the event is destroyed.
//!
//! Everything here runs on one blocking thread per request. No raw pointer
//! leaves the function that obtained it, so none of these types is `Send`,
//! and each op function returns only owned Rust values.

use std::ffi::{c_char, c_int, CStr, CString};
use std::ptr::{self, NonNull};
use std::time::{Duration, Instant};

use rdkafka_sys::bindings as rd;
use rdkafka_sys::bindings::{rd_kafka_admin_op_t as AdminOp, rd_kafka_consumer_group_state_t as GroupState};
use rdkafka_sys::types::RDKafka;

use super::{AdminError, ClusterInfo, ErrorCode, GroupDescription, GroupListing, Member, Node, OffsetSpec, Settings};

/// Declarations of librdkafka symbols that rdkafka-sys also declares, typed
/// to pass the error code as the plain integer it is in C. The bindings type
/// it as a Rust enum, and a broker may send a code that enum does not list
/// (it has gaps and ends at librdkafka's last known code): holding such a
/// value in the enum would be undefined behaviour. A C enum is `int`-sized.
mod raw {
    use std::ffi::c_char;

    use rdkafka_sys::bindings::{rd_kafka_error_t, rd_kafka_event_t, rd_kafka_t};

    extern "C" {
        #[link_name = "rd_kafka_event_error"]
        pub(super) fn event_error(rkev: *mut rd_kafka_event_t) -> i32;
        #[link_name = "rd_kafka_error_code"]
        pub(super) fn error_code(error: *const rd_kafka_error_t) -> i32;
        #[link_name = "rd_kafka_err2name"]
        pub(super) fn err2name(err: i32) -> *const c_char;
        #[link_name = "rd_kafka_err2str"]
        pub(super) fn err2str(err: i32) -> *const c_char;
        #[link_name = "rd_kafka_get_watermark_offsets"]
        pub(super) fn get_watermark_offsets(
            rk: *mut rd_kafka_t,
            topic: *const c_char,
            partition: i32,
            low: *mut i64,
            high: *mut i64,
        ) -> i32;
    }
}

/// librdkafka's short name of an error code (`UNKNOWN_MEMBER_ID`, `_TIMED_OUT`;
/// `ERR_<n>?` for a code it does not know).
pub(super) fn err_name(code: i32) -> String {
    // SAFETY: err2name accepts any integer and returns a static string or one
    // in a thread-local buffer, which `string` copies before anything else
    // on this thread can overwrite it.
    unsafe { string(raw::err2name(code)) }.unwrap_or_default()
}

/// librdkafka's human description of an error code.
pub(super) fn err_description(code: i32) -> String {
    // SAFETY: as in `err_name`.
    unsafe { string(raw::err2str(code)) }.unwrap_or_default()
}

/// An owned librdkafka object, destroyed exactly once when dropped.
pub(super) struct Owned<T> {
    ptr: NonNull<T>,
    destroy: unsafe extern "C" fn(*mut T),
}

impl<T> Owned<T> {
    /// Takes ownership of `ptr`; `None` when librdkafka returned NULL.
    ///
    /// # Safety
    ///
    /// `ptr` is NULL or a live object the caller owns, which `destroy` frees
    /// and nothing else frees.
    unsafe fn new(ptr: *mut T, destroy: unsafe extern "C" fn(*mut T)) -> Option<Self> {
        NonNull::new(ptr).map(|ptr| Owned { ptr, destroy })
    }

    fn as_ptr(&self) -> *mut T {
        self.ptr.as_ptr()
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: by `new`'s contract we own the object and `destroy` frees
        // it; drop runs once.
        unsafe { (self.destroy)(self.ptr.as_ptr()) }
    }
}

fn alloc_failed(op: &'static str, what: &str) -> AdminError {
    AdminError::UnexpectedResult { op, detail: format!("librdkafka returned no {what}") }
}

/// `s` as a C string; an interior NUL is the caller's mistake, not a panic.
pub(super) fn c_string(what: &str, s: &str) -> Result<CString, AdminError> {
    CString::new(s).map_err(|_| AdminError::InvalidArgument(format!("{what} {s:?} contains a NUL byte")))
}

/// Copies a C string; NULL reads as `None`, invalid UTF-8 is replaced.
///
/// # Safety
///
/// `p` is NULL or points to a NUL-terminated string valid for this call.
unsafe fn string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL, and valid by the caller's contract.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The pointers of a C array returned by a `*_result_*` accessor, NULL
/// entries skipped.
///
/// # Safety
///
/// `arr` is NULL or points to `cnt` readable pointers.
unsafe fn pointers<T>(arr: *mut *const T, cnt: usize) -> Vec<*const T> {
    if arr.is_null() {
        return Vec::new();
    }
    // SAFETY: `arr` holds `cnt` elements by the caller's contract.
    (0..cnt).map(|i| unsafe { arr.add(i).read() }).filter(|p| !p.is_null()).collect()
}

/// Milliseconds for librdkafka's `int` timeouts, saturating.
fn millis(d: Duration) -> c_int {
    c_int::try_from(d.as_millis()).unwrap_or(c_int::MAX)
}

/// Code and message of a librdkafka error object; `None` for NULL or no error.
///
/// # Safety
///
/// `err` is NULL or a valid error object for this call.
unsafe fn read_error(err: *const rd::rd_kafka_error_t) -> Option<(ErrorCode, String)> {
    if err.is_null() {
        return None;
    }
    // SAFETY: valid by the caller's contract; see `raw` for the integer type.
    let code = unsafe { raw::error_code(err) };
    if code == 0 {
        return None;
    }
    // SAFETY: as above; the string lives as long as the error object.
    let message = unsafe { string(rd::rd_kafka_error_string(err)) }.unwrap_or_default();
    Some((ErrorCode(code), message))
}

/// A broker node, copied.
///
/// # Safety
///
/// `n` is NULL or a valid node for this call.
unsafe fn read_node(n: *const rd::rd_kafka_Node_t) -> Option<Node> {
    if n.is_null() {
        return None;
    }
    // SAFETY: valid by the caller's contract; the strings live as long as the node.
    unsafe {
        Some(Node {
            id: rd::rd_kafka_Node_id(n),
            host: string(rd::rd_kafka_Node_host(n)).unwrap_or_default(),
            port: rd::rd_kafka_Node_port(n),
            rack: string(rd::rd_kafka_Node_rack(n)),
        })
    }
}

/// One element of a librdkafka topic-partition list, copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawPartition {
    pub(super) topic: String,
    pub(super) partition: i32,
    pub(super) offset: i64,
    pub(super) metadata: String,
    pub(super) err: ErrorCode,
}

/// Copies one list element. Fields are read through the raw pointer, never
/// through a reference, and `err` as the integer it is in C (see `raw`).
///
/// # Safety
///
/// `p` points to a valid element for this call.
unsafe fn read_partition(p: *const rd::rd_kafka_topic_partition_t) -> RawPartition {
    // SAFETY: valid by the caller's contract; `rd_kafka_resp_err_t` is a
    // `repr(i32)` field, so reading it as `i32` reads the same bytes; the
    // metadata buffer holds `metadata_size` bytes when non-NULL.
    unsafe {
        let md = ptr::addr_of!((*p).metadata).read();
        let md_size = ptr::addr_of!((*p).metadata_size).read();
        let metadata = if md.is_null() || md_size == 0 {
            String::new()
        } else {
            String::from_utf8_lossy(std::slice::from_raw_parts(md.cast::<u8>(), md_size)).into_owned()
        };
        RawPartition {
            topic: string(ptr::addr_of!((*p).topic).read()).unwrap_or_default(),
            partition: ptr::addr_of!((*p).partition).read(),
            offset: ptr::addr_of!((*p).offset).read(),
            metadata,
            err: ErrorCode(ptr::addr_of!((*p).err).cast::<i32>().read()),
        }
    }
}

/// Copies every element of a list; NULL reads as empty.
///
/// # Safety
///
/// `list` is NULL or a valid list for this call.
unsafe fn read_partitions(list: *const rd::rd_kafka_topic_partition_list_t) -> Vec<RawPartition> {
    if list.is_null() {
        return Vec::new();
    }
    // SAFETY: valid by the caller's contract: `elems` holds `cnt` elements.
    unsafe {
        let cnt = ptr::addr_of!((*list).cnt).read();
        let elems = ptr::addr_of!((*list).elems).read();
        if elems.is_null() || cnt <= 0 {
            return Vec::new();
        }
        (0..cnt as usize).map(|i| read_partition(elems.add(i))).collect()
    }
}

/// A topic-partition list built from Rust values, destroyed on drop
/// (with the metadata buffers it owns).
pub(super) struct PartitionList(Owned<rd::rd_kafka_topic_partition_list_t>);

impl PartitionList {
    pub(super) fn new(op: &'static str, capacity: usize) -> Result<Self, AdminError> {
        let cap = c_int::try_from(capacity)
            .map_err(|_| AdminError::InvalidArgument(format!("{capacity} partitions are too many for one request")))?;
        // SAFETY: the new list is ours; the list destructor frees it.
        unsafe { Owned::new(rd::rd_kafka_topic_partition_list_new(cap), rd::rd_kafka_topic_partition_list_destroy) }
            .map(PartitionList)
            .ok_or_else(|| alloc_failed(op, "partition list"))
    }

    /// Appends `topic`/`partition` with `offset` and, when non-empty, `metadata`.
    pub(super) fn push(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        metadata: Option<&str>,
    ) -> Result<(), AdminError> {
        let topic_c = c_string("topic", topic)?;
        // SAFETY: the list is live; librdkafka copies the topic name.
        let elem = unsafe { rd::rd_kafka_topic_partition_list_add(self.0.as_ptr(), topic_c.as_ptr(), partition) };
        if elem.is_null() {
            return Err(alloc_failed("topic-partition list", "list element"));
        }
        // SAFETY: `elem` points into our list and stays valid until the list
        // is next modified; written through the raw pointer.
        unsafe { ptr::addr_of_mut!((*elem).offset).write(offset) };
        if let Some(md) = metadata.filter(|m| !m.is_empty()) {
            // SAFETY: librdkafka's own allocator: destroying the list frees
            // element metadata with `rd_free`, the matching deallocator.
            let buf = unsafe { rd::rd_kafka_mem_malloc(ptr::null_mut(), md.len()) };
            if buf.is_null() {
                return Err(alloc_failed("topic-partition list", "metadata buffer"));
            }
            // SAFETY: `buf` has `md.len()` writable bytes and is fresh, so
            // the regions do not overlap; `elem` as above. The element had
            // no metadata, so nothing is leaked.
            unsafe {
                ptr::copy_nonoverlapping(md.as_ptr(), buf.cast::<u8>(), md.len());
                ptr::addr_of_mut!((*elem).metadata).write(buf);
                ptr::addr_of_mut!((*elem).metadata_size).write(md.len());
            }
        }
        Ok(())
    }

    fn as_ptr(&self) -> *mut rd::rd_kafka_topic_partition_list_t {
        self.0.as_ptr()
    }

    #[cfg(test)]
    pub(super) fn read(&self) -> Vec<RawPartition> {
        // SAFETY: the list is live and ours.
        unsafe { read_partitions(self.as_ptr()) }
    }
}

/// The result event of one admin request, destroyed on drop.
struct Event {
    ev: Owned<rd::rd_kafka_event_t>,
    op: &'static str,
}

impl Event {
    fn as_ptr(&self) -> *mut rd::rd_kafka_event_t {
        self.ev.as_ptr()
    }

    /// The typed result pointer an accessor returns, or an error for NULL.
    fn result<R>(
        &self,
        get: unsafe extern "C" fn(*mut rd::rd_kafka_event_t) -> *const R,
    ) -> Result<*const R, AdminError> {
        // SAFETY: the event is live, and `request` checked that its type is
        // the one whose accessor the caller passes; accessors return NULL on
        // a type mismatch anyway.
        let res = unsafe { get(self.as_ptr()) };
        if res.is_null() {
            return Err(AdminError::UnexpectedResult { op: self.op, detail: "the event carries no result".into() });
        }
        Ok(res)
    }
}

/// Extra margin over the request timeout before giving up on the queue:
/// librdkafka itself answers with `_TIMED_OUT` at the request timeout.
const GRACE: Duration = Duration::from_secs(5);

/// Sends one admin request on a private queue and waits for its result event.
///
/// `submit` receives the options and the queue and calls the librdkafka admin
/// function. librdkafka copies the request arguments, so the caller may drop
/// its request objects once `submit` returns; the queue lives until the
/// result is taken from it, and librdkafka keeps its own reference if we give
/// up first.
fn request(
    rk: *mut RDKafka,
    api: AdminOp,
    op: &'static str,
    settings: Settings,
    expected: rd::rd_kafka_event_type_t,
    submit: impl FnOnce(*const rd::rd_kafka_AdminOptions_t, *mut rd::rd_kafka_queue_t),
) -> Result<Event, AdminError> {
    // SAFETY: `rk` is a live client handle (the caller holds its client);
    // the new queue is ours to destroy.
    let queue = unsafe { Owned::new(rd::rd_kafka_queue_new(rk), rd::rd_kafka_queue_destroy) }
        .ok_or_else(|| alloc_failed(op, "queue"))?;
    // SAFETY: as above; the new options are ours to destroy.
    let options = unsafe { Owned::new(rd::rd_kafka_AdminOptions_new(rk, api), rd::rd_kafka_AdminOptions_destroy) }
        .ok_or_else(|| alloc_failed(op, "admin options"))?;

    let mut errstr = [0 as c_char; 512];
    // SAFETY: the options are live; `errstr` is writable for its length.
    let err = unsafe {
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options.as_ptr(),
            millis(settings.timeout),
            errstr.as_mut_ptr(),
            errstr.len(),
        )
    };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        // SAFETY: librdkafka NUL-terminates the message it writes, and the
        // buffer starts zeroed.
        let msg = unsafe { string(errstr.as_ptr()) }.unwrap_or_default();
        return Err(AdminError::InvalidArgument(format!("request timeout {:?}: {msg}", settings.timeout)));
    }
    if settings.read_committed && api == AdminOp::RD_KAFKA_ADMIN_OP_LISTOFFSETS {
        // SAFETY: the options are live; the returned error (if any) is ours.
        let e = unsafe {
            Owned::new(
                rd::rd_kafka_AdminOptions_set_isolation_level(
                    options.as_ptr(),
                    rd::rd_kafka_IsolationLevel_t::RD_KAFKA_ISOLATION_LEVEL_READ_COMMITTED,
                ),
                rd::rd_kafka_error_destroy,
            )
        };
        if let Some(e) = e {
            // SAFETY: `e` is live.
            let (code, message) = unsafe { read_error(e.as_ptr()) }.unwrap_or((ErrorCode(-1), String::new()));
            return Err(AdminError::Request { op, code, message });
        }
    }

    submit(options.as_ptr(), queue.as_ptr());

    let deadline = Instant::now() + settings.timeout + GRACE;
    let ev = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AdminError::Timeout { op, after: settings.timeout + GRACE });
        }
        // SAFETY: the queue is live; a returned event is ours to destroy.
        let polled = unsafe { rd::rd_kafka_queue_poll(queue.as_ptr(), millis(left)) };
        // SAFETY: as above.
        if let Some(ev) = unsafe { Owned::new(polled, rd::rd_kafka_event_destroy) } {
            break Event { ev, op };
        }
    };

    // SAFETY: the event is live.
    let typ = unsafe { rd::rd_kafka_event_type(ev.as_ptr()) };
    if typ != expected {
        return Err(AdminError::UnexpectedResult { op, detail: format!("event type {typ}, expected {expected}") });
    }
    // SAFETY: the event is live; see `raw` for the integer type.
    let code = unsafe { raw::event_error(ev.as_ptr()) };
    if code != 0 {
        if code == ErrorCode::TIMED_OUT.0 {
            return Err(AdminError::Timeout { op, after: settings.timeout });
        }
        // SAFETY: the event is live; the string lives as long as it.
        let message = unsafe { string(rd::rd_kafka_event_error_string(ev.as_ptr())) }.unwrap_or_default();
        return Err(AdminError::Request { op, code: ErrorCode(code), message });
    }
    Ok(ev)
}

/// `rd_kafka_DescribeCluster`.
pub(super) fn describe_cluster(rk: *mut RDKafka, settings: Settings) -> Result<ClusterInfo, AdminError> {
    const OP: &str = "DescribeCluster";
    let ev = request(
        rk,
        AdminOp::RD_KAFKA_ADMIN_OP_DESCRIBECLUSTER,
        OP,
        settings,
        rd::RD_KAFKA_EVENT_DESCRIBECLUSTER_RESULT,
        |opts, queue| {
            // SAFETY: `rk`, the options and the queue are live for the call.
            unsafe { rd::rd_kafka_DescribeCluster(rk, opts, queue) }
        },
    )?;
    let res = ev.result(rd::rd_kafka_event_DescribeCluster_result)?;
    // SAFETY: `res` and everything reached from it live as long as `ev`,
    // which outlives this block; every value is copied out.
    let (cluster_id, controller, nodes) = unsafe {
        let mut cnt = 0usize;
        let nodes = rd::rd_kafka_DescribeCluster_result_nodes(res, &mut cnt);
        let nodes: Vec<Node> = pointers(nodes, cnt).into_iter().filter_map(|n| read_node(n)).collect();
        let controller = read_node(rd::rd_kafka_DescribeCluster_result_controller(res));
        (string(rd::rd_kafka_DescribeCluster_result_cluster_id(res)), controller, nodes)
    };
    let cluster_id =
        cluster_id.ok_or_else(|| AdminError::UnexpectedResult { op: OP, detail: "no cluster id".into() })?;
    Ok(ClusterInfo { cluster_id, controller_id: controller.map(|n| n.id), nodes })
}

/// librdkafka's `RD_KAFKA_OFFSET_INVALID`: "no offset" in a list element.
pub(super) const OFFSET_INVALID: i64 = -1001;

/// Per-group result of an offsets request: group-level error or partitions.
///
/// # Safety
///
/// `groups`/`cnt` come from a live result's `*_result_groups` accessor.
unsafe fn read_group_results(
    op: &'static str,
    group: &str,
    groups: *mut *const rd::rd_kafka_group_result_t,
    cnt: usize,
) -> Result<Vec<RawPartition>, AdminError> {
    // SAFETY: by the caller's contract.
    let groups = unsafe { pointers(groups, cnt) };
    let [g] = groups[..] else {
        return Err(AdminError::UnexpectedResult {
            op,
            detail: format!("{} group results for one group", groups.len()),
        });
    };
    // SAFETY: `g` is a live group result; its error and list live as long.
    unsafe {
        if let Some((code, message)) = read_error(rd::rd_kafka_group_result_error(g)) {
            return Err(AdminError::Target { op, target: group.to_owned(), code, message });
        }
        Ok(read_partitions(rd::rd_kafka_group_result_partitions(g)))
    }
}

/// `rd_kafka_ListConsumerGroupOffsets` for one group; `None` lists every
/// partition the group has committed.
pub(super) fn list_group_offsets(
    rk: *mut RDKafka,
    settings: Settings,
    group: &str,
    partitions: Option<&[(String, i32)]>,
) -> Result<Vec<RawPartition>, AdminError> {
    const OP: &str = "ListConsumerGroupOffsets";
    let group_c = c_string("group", group)?;
    let list = match partitions {
        None => None,
        Some(ps) => {
            let mut list = PartitionList::new(OP, ps.len())?;
            for (topic, partition) in ps {
                list.push(topic, *partition, OFFSET_INVALID, None)?;
            }
            Some(list)
        }
    };
    let list_ptr = list.as_ref().map_or(ptr::null(), |l| l.as_ptr().cast_const());
    // SAFETY: both arguments are valid for the call (NULL partitions means
    // all); the function copies them; the new object is ours to destroy.
    let req = unsafe {
        Owned::new(
            rd::rd_kafka_ListConsumerGroupOffsets_new(group_c.as_ptr(), list_ptr),
            rd::rd_kafka_ListConsumerGroupOffsets_destroy,
        )
    }
    .ok_or_else(|| alloc_failed(OP, "request object"))?;
    let ev = request(
        rk,
        AdminOp::RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPOFFSETS,
        OP,
        settings,
        rd::RD_KAFKA_EVENT_LISTCONSUMERGROUPOFFSETS_RESULT,
        |opts, queue| {
            let mut reqs = [req.as_ptr()];
            // SAFETY: one live request object, as the API requires; `rk`,
            // the options and the queue are live for the call.
            unsafe { rd::rd_kafka_ListConsumerGroupOffsets(rk, reqs.as_mut_ptr(), 1, opts, queue) }
        },
    )?;
    let res = ev.result(rd::rd_kafka_event_ListConsumerGroupOffsets_result)?;
    // SAFETY: `res` lives as long as `ev`.
    unsafe {
        let mut cnt = 0usize;
        let groups = rd::rd_kafka_ListConsumerGroupOffsets_result_groups(res, &mut cnt);
        read_group_results(OP, group, groups, cnt)
    }
}

/// `rd_kafka_AlterConsumerGroupOffsets` for one group.
pub(super) fn alter_group_offsets(
    rk: *mut RDKafka,
    settings: Settings,
    group: &str,
    offsets: &[(String, i32, i64, String)],
) -> Result<Vec<RawPartition>, AdminError> {
    const OP: &str = "AlterConsumerGroupOffsets";
    let group_c = c_string("group", group)?;
    let mut list = PartitionList::new(OP, offsets.len())?;
    for (topic, partition, offset, metadata) in offsets {
        list.push(topic, *partition, *offset, Some(metadata))?;
    }
    // SAFETY: valid arguments, copied by the function; the object is ours.
    let req = unsafe {
        Owned::new(
            rd::rd_kafka_AlterConsumerGroupOffsets_new(group_c.as_ptr(), list.as_ptr()),
            rd::rd_kafka_AlterConsumerGroupOffsets_destroy,
        )
    }
    .ok_or_else(|| alloc_failed(OP, "request object"))?;
    let ev = request(
        rk,
        AdminOp::RD_KAFKA_ADMIN_OP_ALTERCONSUMERGROUPOFFSETS,
        OP,
        settings,
        rd::RD_KAFKA_EVENT_ALTERCONSUMERGROUPOFFSETS_RESULT,
        |opts, queue| {
            let mut reqs = [req.as_ptr()];
            // SAFETY: one live request object, as the API requires; `rk`,
            // the options and the queue are live for the call.
            unsafe { rd::rd_kafka_AlterConsumerGroupOffsets(rk, reqs.as_mut_ptr(), 1, opts, queue) }
        },
    )?;
    let res = ev.result(rd::rd_kafka_event_AlterConsumerGroupOffsets_result)?;
    // SAFETY: `res` lives as long as `ev`.
    unsafe {
        let mut cnt = 0usize;
        let groups = rd::rd_kafka_AlterConsumerGroupOffsets_result_groups(res, &mut cnt);
        read_group_results(OP, group, groups, cnt)
    }
}

/// `rd_kafka_DeleteConsumerGroupOffsets` for one group: the partitions'
/// committed offsets are removed, so the group has none there (as before
/// its first commit).
pub(super) fn delete_group_offsets(
    rk: *mut RDKafka,
    settings: Settings,
    group: &str,
    partitions: &[(String, i32)],
) -> Result<Vec<RawPartition>, AdminError> {
    const OP: &str = "DeleteConsumerGroupOffsets";
    let group_c = c_string("group", group)?;
    let mut list = PartitionList::new(OP, partitions.len())?;
    for (topic, partition) in partitions {
        list.push(topic, *partition, OFFSET_INVALID, None)?;
    }
    // SAFETY: valid arguments, copied by the function (only topic and
    // partition are read); the object is ours.
    let req = unsafe {
        Owned::new(
            rd::rd_kafka_DeleteConsumerGroupOffsets_new(group_c.as_ptr(), list.as_ptr()),
            rd::rd_kafka_DeleteConsumerGroupOffsets_destroy,
        )
    }
    .ok_or_else(|| alloc_failed(OP, "request object"))?;
    let ev = request(
        rk,
        AdminOp::RD_KAFKA_ADMIN_OP_DELETECONSUMERGROUPOFFSETS,
        OP,
        settings,
        rd::RD_KAFKA_EVENT_DELETECONSUMERGROUPOFFSETS_RESULT,
        |opts, queue| {
            let mut reqs = [req.as_ptr()];
            // SAFETY: exactly one live request object, as the API requires;
            // `rk`, the options and the queue are live for the call.
            unsafe { rd::rd_kafka_DeleteConsumerGroupOffsets(rk, reqs.as_mut_ptr(), 1, opts, queue) }
        },
    )?;
    let res = ev.result(rd::rd_kafka_event_DeleteConsumerGroupOffsets_result)?;
    // SAFETY: `res` lives as long as `ev`.
    unsafe {
        let mut cnt = 0usize;
        let groups = rd::rd_kafka_DeleteConsumerGroupOffsets_result_groups(res, &mut cnt);
        read_group_results(OP, group, groups, cnt)
    }
}

/// A `ListOffsets` answer for one partition: the copied element (offset and
/// error) and the timestamp librdkafka reports beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawListedOffset {
    pub(super) partition: RawPartition,
    pub(super) timestamp: i64,
}

/// `rd_kafka_ListOffsets`.
pub(super) fn list_offsets(
    rk: *mut RDKafka,
    settings: Settings,
    partitions: &[(String, i32)],
    spec: OffsetSpec,
) -> Result<Vec<RawListedOffset>, AdminError> {
    const OP: &str = "ListOffsets";
    let mut list = PartitionList::new(OP, partitions.len())?;
    for (topic, partition) in partitions {
        list.push(topic, *partition, spec.to_raw()?, None)?;
    }
    let ev = request(
        rk,
        AdminOp::RD_KAFKA_ADMIN_OP_LISTOFFSETS,
        OP,
        settings,
        rd::RD_KAFKA_EVENT_LISTOFFSETS_RESULT,
        |opts, queue| {
            // SAFETY: the list is live (librdkafka copies it); `rk`, the
            // options and the queue are live for the call.
            unsafe { rd::rd_kafka_ListOffsets(rk, list.as_ptr(), opts, queue) }
        },
    )?;
    let res = ev.result(rd::rd_kafka_event_ListOffsets_result)?;
    // SAFETY: `res` and its infos live as long as `ev`.
    unsafe {
        let mut cnt = 0usize;
        let infos = rd::rd_kafka_ListOffsets_result_infos(res, &mut cnt);
        let mut out = Vec::with_capacity(cnt);
        for info in pointers(infos, cnt) {
            let tp = rd::rd_kafka_ListOffsetsResultInfo_topic_partition(info);
            if tp.is_null() {
                return Err(AdminError::UnexpectedResult { op: OP, detail: "a result without its partition".into() });
            }
            out.push(RawListedOffset {
                partition: read_partition(tp),
                timestamp: rd::rd_kafka_ListOffsetsResultInfo_timestamp(info),
            });
        }
        Ok(out)
    }
}

/// An error's code and librdkafka's message.
pub(super) type CodeAndMessage = (ErrorCode, String);

/// A group DescribeConsumerGroups failed for: its id, code and message.
pub(super) type GroupFailure = (String, ErrorCode, String);

/// `rd_kafka_ListConsumerGroups`: the groups and the per-broker errors.
pub(super) fn list_groups(
    rk: *mut RDKafka,
    settings: Settings,
) -> Result<(Vec<GroupListing>, Vec<CodeAndMessage>), AdminError> {
    const OP: &str = "ListConsumerGroups";
    let ev = request(
        rk,
        AdminOp::RD_KAFKA_ADMIN_OP_LISTCONSUMERGROUPS,
        OP,
        settings,
        rd::RD_KAFKA_EVENT_LISTCONSUMERGROUPS_RESULT,
        |opts, queue| {
            // SAFETY: `rk`, the options and the queue are live for the call.
            unsafe { rd::rd_kafka_ListConsumerGroups(rk, opts, queue) }
        },
    )?;
    let res = ev.result(rd::rd_kafka_event_ListConsumerGroups_result)?;
    // SAFETY: `res` and the listings and errors it holds live as long as `ev`.
    unsafe {
        let mut cnt = 0usize;
        let valid = rd::rd_kafka_ListConsumerGroups_result_valid(res, &mut cnt);
        let groups = pointers(valid, cnt)
            .into_iter()
            .map(|g| GroupListing {
                group_id: string(rd::rd_kafka_ConsumerGroupListing_group_id(g)).unwrap_or_default(),
                state: state_name(rd::rd_kafka_ConsumerGroupListing_state(g)).to_owned(),
                is_simple: rd::rd_kafka_ConsumerGroupListing_is_simple_consumer_group(g) != 0,
                group_type: group_type_name(rd::rd_kafka_ConsumerGroupListing_type(g)).to_owned(),
            })
            .collect();
        let mut cnt = 0usize;
        let errors = rd::rd_kafka_ListConsumerGroups_result_errors(res, &mut cnt);
        let errors = pointers(errors, cnt).into_iter().filter_map(|e| read_error(e)).collect();
        Ok((groups, errors))
    }
}

/// `rd_kafka_DescribeConsumerGroups`: each group's description or error.
pub(super) fn describe_groups(
    rk: *mut RDKafka,
    settings: Settings,
    groups: &[String],
) -> Result<Vec<Result<GroupDescription, GroupFailure>>, AdminError> {
    const OP: &str = "DescribeConsumerGroups";
    let names = groups.iter().map(|g| c_string("group", g)).collect::<Result<Vec<_>, _>>()?;
    let ev = request(
        rk,
        AdminOp::RD_KAFKA_ADMIN_OP_DESCRIBECONSUMERGROUPS,
        OP,
        settings,
        rd::RD_KAFKA_EVENT_DESCRIBECONSUMERGROUPS_RESULT,
        |opts, queue| {
            let mut ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
            // SAFETY: `ptrs` holds `ptrs.len()` live C strings (copied by the
            // call); `rk`, the options and the queue are live for the call.
            unsafe { rd::rd_kafka_DescribeConsumerGroups(rk, ptrs.as_mut_ptr(), ptrs.len(), opts, queue) }
        },
    )?;
    let res = ev.result(rd::rd_kafka_event_DescribeConsumerGroups_result)?;
    // SAFETY: `res` and everything reached from it live as long as `ev`.
    unsafe {
        let mut cnt = 0usize;
        let descs = rd::rd_kafka_DescribeConsumerGroups_result_groups(res, &mut cnt);
        Ok(pointers(descs, cnt).into_iter().map(|d| read_group_description(d)).collect())
    }
}

/// # Safety
///
/// `d` is a valid group description for this call.
unsafe fn read_group_description(
    d: *const rd::rd_kafka_ConsumerGroupDescription_t,
) -> Result<GroupDescription, GroupFailure> {
    // SAFETY: by the caller's contract; members, assignments and strings
    // live as long as the description.
    unsafe {
        let group_id = string(rd::rd_kafka_ConsumerGroupDescription_group_id(d)).unwrap_or_default();
        if let Some((code, message)) = read_error(rd::rd_kafka_ConsumerGroupDescription_error(d)) {
            return Err((group_id, code, message));
        }
        let is_simple = rd::rd_kafka_ConsumerGroupDescription_is_simple_consumer_group(d) != 0;
        let members = (0..rd::rd_kafka_ConsumerGroupDescription_member_count(d))
            .map(|i| rd::rd_kafka_ConsumerGroupDescription_member(d, i))
            .filter(|m| !m.is_null())
            .map(|m| {
                let assignment = rd::rd_kafka_MemberDescription_assignment(m);
                let partitions = if assignment.is_null() {
                    Vec::new()
                } else {
                    read_partitions(rd::rd_kafka_MemberAssignment_partitions(assignment))
                };
                Member {
                    member_id: string(rd::rd_kafka_MemberDescription_consumer_id(m)).unwrap_or_default(),
                    group_instance_id: string(rd::rd_kafka_MemberDescription_group_instance_id(m))
                        .filter(|s| !s.is_empty()),
                    client_id: string(rd::rd_kafka_MemberDescription_client_id(m)).unwrap_or_default(),
                    host: string(rd::rd_kafka_MemberDescription_host(m)).unwrap_or_default(),
                    assignment: partitions.into_iter().map(|p| (p.topic, p.partition)).collect(),
                }
            })
            .collect();
        Ok(GroupDescription {
            group_id,
            state: state_name(rd::rd_kafka_ConsumerGroupDescription_state(d)).to_owned(),
            group_type: group_type_name(rd::rd_kafka_ConsumerGroupDescription_type(d)).to_owned(),
            protocol_type: if is_simple { String::new() } else { "consumer".to_owned() },
            is_simple,
            partition_assignor: string(rd::rd_kafka_ConsumerGroupDescription_partition_assignor(d)).unwrap_or_default(),
            members,
            coordinator: read_node(rd::rd_kafka_ConsumerGroupDescription_coordinator(d)),
        })
    }
}

/// The broker's name of a group state, as `kafka-consumer-groups` prints it.
/// librdkafka maps state names it does not know (KIP-848's `Assigning`,
/// `Reconciling`) to `Unknown`.
pub(super) fn state_name(state: GroupState) -> &'static str {
    match state {
        GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_UNKNOWN => "Unknown",
        GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_PREPARING_REBALANCE => "PreparingRebalance",
        GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_COMPLETING_REBALANCE => "CompletingRebalance",
        GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_STABLE => "Stable",
        GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_DEAD => "Dead",
        GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_EMPTY => "Empty",
        GroupState::RD_KAFKA_CONSUMER_GROUP_STATE__CNT => "Unknown",
    }
}

/// The group's protocol family: `Classic` (JoinGroup/SyncGroup) or
/// `Consumer` (KIP-848); `Unknown` from brokers that do not say.
pub(super) fn group_type_name(t: rd::rd_kafka_consumer_group_type_t) -> &'static str {
    use rd::rd_kafka_consumer_group_type_t as T;
    match t {
        T::RD_KAFKA_CONSUMER_GROUP_TYPE_CONSUMER => "Consumer",
        T::RD_KAFKA_CONSUMER_GROUP_TYPE_CLASSIC => "Classic",
        T::RD_KAFKA_CONSUMER_GROUP_TYPE_UNKNOWN | T::RD_KAFKA_CONSUMER_GROUP_TYPE__CNT => "Unknown",
    }
}

/// The partition's low and high watermarks as the client last saw them in a
/// fetch response (`rd_kafka_get_watermark_offsets`: no request is sent).
/// `None` when the client has no value yet.
pub(crate) fn cached_watermarks(rk: *mut RDKafka, topic: &str, partition: i32) -> Option<(i64, i64)> {
    let topic = CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: `rk` is a live client handle owned by the caller for the whole
    // call; `topic` is a NUL-terminated string that outlives the call; `low`
    // and `high` are valid for writes. The function only reads cached state.
    let err = unsafe { raw::get_watermark_offsets(rk, topic.as_ptr(), partition, &mut low, &mut high) };
    (err == 0 && high >= 0).then_some((low, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_list_reads_back_with_offsets_and_metadata() -> Result<(), AdminError> {
        let mut list = PartitionList::new("test", 2)?;
        list.push("orders", 0, 42, Some("oncely:reset:1"))?;
        list.push("orders", 3, -1001, None)?;
        list.push("payments", 1, 7, Some(""))?;
        let read = list.read();
        let ok = ErrorCode(0);
        assert_eq!(
            read,
            vec![
                RawPartition {
                    topic: "orders".into(),
                    partition: 0,
                    offset: 42,
                    metadata: "oncely:reset:1".into(),
                    err: ok
                },
                RawPartition { topic: "orders".into(), partition: 3, offset: -1001, metadata: String::new(), err: ok },
                RawPartition { topic: "payments".into(), partition: 1, offset: 7, metadata: String::new(), err: ok },
            ]
        );
        Ok(())
    }

    #[test]
    fn a_topic_with_a_nul_byte_is_an_argument_error_not_a_panic() -> Result<(), AdminError> {
        let mut list = PartitionList::new("test", 1)?;
        assert!(matches!(list.push("or\0ders", 0, 0, None), Err(AdminError::InvalidArgument(_))));
        Ok(())
    }

    #[test]
    fn codes_unknown_to_librdkafka_have_a_name_too() {
        assert_eq!(err_name(25), "UNKNOWN_MEMBER_ID");
        assert_eq!(err_name(-185), "_TIMED_OUT");
        // Inside a gap of the bindings' enum and past its end: no UB, a name.
        assert_eq!(err_name(120), "ERR_120?");
        assert_eq!(err_name(4000), "ERR_4000?");
        assert!(!err_description(25).is_empty());
    }

    #[test]
    fn states_use_the_brokers_names() {
        assert_eq!(state_name(GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_STABLE), "Stable");
        assert_eq!(state_name(GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_EMPTY), "Empty");
        assert_eq!(state_name(GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_PREPARING_REBALANCE), "PreparingRebalance");
        // The names agree with librdkafka's own table.
        for s in [
            GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_UNKNOWN,
            GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_PREPARING_REBALANCE,
            GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_COMPLETING_REBALANCE,
            GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_STABLE,
            GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_DEAD,
            GroupState::RD_KAFKA_CONSUMER_GROUP_STATE_EMPTY,
        ] {
            // SAFETY: a valid state; the name is a static string.
            let theirs = unsafe { string(rd::rd_kafka_consumer_group_state_name(s)) };
            assert_eq!(theirs.as_deref(), Some(state_name(s)));
        }
    }
}
