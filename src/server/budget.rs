//! Budgets shared by every connection and stream, so that no mix of concurrent requests can take
//! the process's memory or both cores:
//!
//! - **upload**: body bytes received and not yet handed to the engine. Charged frame by frame as
//!   the bytes arrive (an announced length costs nothing until it is sent), so holding it costs a
//!   peer the bandwidth of actually sending.
//! - **decode**: what a received review will take in memory once decoded, estimated from its
//!   shape in the same pass that receives it ([`Shape`]). A 4 MiB review of empty volumes decodes
//!   to over a gigabyte of `k8s_openapi` structs; the estimate refuses it before it is decoded.
//! - **heavy**: how many large reviews are decoded and planned at once, on the blocking pool
//!   rather than the I/O workers, so that the other requests and the admin port keep answering.
//!   A few more may wait for their turn (within their own deadline); beyond that they are
//!   refused at once, so that waiting bodies cannot hold the upload budget.
//!
//! A request waits for budget at most [`BUDGET_WAIT`]; then it is answered with an `invalid`
//! review that says why (never an HTTP error). While it waits, the upload that has been arriving
//! longest (for at least [`CUT_AGE`], and holding budget) is cut: a peer that holds the budget with
//! bodies it does not finish loses them, while the API server's bodies, sent at once, finish in
//! milliseconds.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, EphemeralContainer, Volume};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long a request may wait for any one budget.
pub const BUDGET_WAIT: Duration = Duration::from_secs(1);
/// Uploads younger than this are never cut (a 4 MiB body arrives in well under this on a LAN).
pub const CUT_AGE: Duration = Duration::from_millis(250);
/// While waiting for upload budget, another upload is cut this often.
const CUT_EVERY: Duration = Duration::from_millis(50);
/// Reviews estimated at least this large are decoded off the I/O workers (real pods: ~100 KiB).
const HEAVY_ESTIMATE: u64 = 8 * 1024 * 1024;
/// Bodies at least this large are decoded off the I/O workers (real pods: a few KiB).
const HEAVY_BODY: usize = 256 * 1024;

pub struct Budgets {
    upload: Arc<Semaphore>,
    upload_total: usize,
    uploads: Arc<Uploads>,
    decode: Arc<Semaphore>,
    decode_total: usize,
    heavy: Arc<Semaphore>,
    /// Large reviews waiting for a turn, and how many may.
    heavy_waiting: AtomicUsize,
    heavy_queue: usize,
}

/// Why a request could not get its share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// It waited [`BUDGET_WAIT`] and the budget stayed taken.
    Busy,
    /// It needs more than the budget allows one request.
    TooLarge,
    /// Its upload was cut to make room for others.
    Cut,
}

impl Budgets {
    /// `upload` and `decode` in bytes; `heavy` large reviews at once.
    pub fn new(upload: usize, decode: usize, heavy: usize) -> Self {
        // Permits are bytes; tokio caps a semaphore at `usize::MAX >> 3` and one acquisition at
        // `u32::MAX`, so larger budgets are clamped (4 GiB is far beyond any sane setting).
        let clamp = |n: usize| n.clamp(1, u32::MAX as usize);
        Self {
            upload: Arc::new(Semaphore::new(clamp(upload))),
            upload_total: clamp(upload),
            uploads: Arc::default(),
            decode: Arc::new(Semaphore::new(clamp(decode))),
            decode_total: clamp(decode),
            heavy: Arc::new(Semaphore::new(heavy.max(1))),
            heavy_waiting: AtomicUsize::new(0),
            heavy_queue: 2 * heavy.max(1),
        }
    }

    pub fn upload_total(&self) -> usize {
        self.upload_total
    }

    pub fn decode_total(&self) -> usize {
        self.decode_total
    }

    /// The most one review may be estimated at: half the decode budget, so that a large review
    /// being decoded always leaves the other half to the small ones.
    pub fn decode_limit(&self) -> usize {
        self.decode_total / 2
    }

    /// Puts an upload on the books (so that it can be cut) until the returned value is dropped.
    pub fn begin_upload(&self) -> Upload {
        self.uploads.begin()
    }

    /// `n` more bytes of upload into `held`, waiting until `until` at most. While it waits, the
    /// oldest other upload is cut every [`CUT_EVERY`]; if `me` is cut meanwhile, it gives up.
    pub async fn upload(
        &self,
        held: &mut Option<OwnedSemaphorePermit>,
        n: usize,
        until: Instant,
        me: &Upload,
    ) -> Result<(), Shortfall> {
        if n > self.upload_total {
            return Err(Shortfall::TooLarge);
        }
        let n = u32::try_from(n).map_err(|_| Shortfall::TooLarge)?;
        let more = match self.upload.clone().try_acquire_many_owned(n) {
            Ok(permit) => permit,
            Err(_) => {
                let acquire = self.upload.clone().acquire_many_owned(n);
                tokio::pin!(acquire);
                loop {
                    self.uploads.cut_oldest(me.id);
                    let next_cut = Instant::now() + CUT_EVERY;
                    tokio::select! {
                        acquired = &mut acquire => match acquired {
                            Ok(permit) => break permit,
                            Err(_) => return Err(Shortfall::Busy),
                        },
                        _ = me.state.cut.notified() => return Err(Shortfall::Cut),
                        _ = tokio::time::sleep_until(until) => return Err(Shortfall::Busy),
                        _ = tokio::time::sleep_until(next_cut) => {}
                    }
                }
            }
        };
        match held {
            Some(permit) => permit.merge(more),
            None => *held = Some(more),
        }
        me.state.held.fetch_add(n as usize, Ordering::AcqRel);
        Ok(())
    }

    /// `n` bytes of decode budget, waiting until `until` at most.
    pub async fn decode(&self, n: u64, until: Instant) -> Result<OwnedSemaphorePermit, Shortfall> {
        let n = usize::try_from(n).map_err(|_| Shortfall::TooLarge)?;
        if n > self.decode_limit() {
            return Err(Shortfall::TooLarge);
        }
        acquire(&self.decode, self.decode_total, n, until).await
    }

    /// A turn at decoding a large review, waiting until `until` at most.
    /// Refused at once when the queue is full.
    pub async fn heavy(&self, until: Instant) -> Result<OwnedSemaphorePermit, Shortfall> {
        if let Ok(permit) = self.heavy.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.heavy_waiting.fetch_add(1, Ordering::AcqRel) >= self.heavy_queue {
            self.heavy_waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Shortfall::Busy);
        }
        let turn = tokio::time::timeout_at(until, self.heavy.clone().acquire_owned()).await;
        self.heavy_waiting.fetch_sub(1, Ordering::AcqRel);
        match turn {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Shortfall::Busy),
        }
    }
}

async fn acquire(
    semaphore: &Arc<Semaphore>,
    total: usize,
    n: usize,
    until: Instant,
) -> Result<OwnedSemaphorePermit, Shortfall> {
    if n > total {
        return Err(Shortfall::TooLarge);
    }
    // `n <= total <= u32::MAX` (see `Budgets::new`).
    let n = u32::try_from(n).map_err(|_| Shortfall::TooLarge)?;
    match tokio::time::timeout_at(until, semaphore.clone().acquire_many_owned(n)).await {
        Ok(Ok(permit)) => Ok(permit),
        // Closed never happens (the semaphores are never closed); treat it as busy.
        _ => Err(Shortfall::Busy),
    }
}

/// Uploads in progress, oldest first, so that the oldest can be cut.
#[derive(Default)]
pub struct Uploads {
    open: Mutex<BTreeMap<u64, Arc<UploadState>>>,
    next_id: AtomicU64,
}

pub struct UploadState {
    started: Instant,
    /// Upload budget it holds (only an upload that holds some is worth cutting).
    held: AtomicUsize,
    pub cut: Notify,
}

/// One upload on the books; `state.cut` fires when it must give up its budget.
pub struct Upload {
    uploads: Arc<Uploads>,
    id: u64,
    pub state: Arc<UploadState>,
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.uploads.lock().remove(&self.id);
    }
}

impl Uploads {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<UploadState>>> {
        // Only inserted into and removed from: a poisoned map is still whole.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn begin(self: &Arc<Self>) -> Upload {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(UploadState {
            started: Instant::now(),
            held: AtomicUsize::new(0),
            cut: Notify::new(),
        });
        self.lock().insert(id, state.clone());
        Upload {
            uploads: self.clone(),
            id,
            state,
        }
    }

    /// Cuts the oldest upload other than `me` that has been arriving for [`CUT_AGE`] at least and
    /// holds budget. A body that waits for its first bytes of budget (a small review delayed by a
    /// busy server) holds none, so it is never cut.
    fn cut_oldest(&self, me: u64) -> bool {
        let mut open = self.lock();
        let oldest = open
            .iter()
            .find(|(id, state)| {
                **id != me
                    && state.started.elapsed() >= CUT_AGE
                    && state.held.load(Ordering::Acquire) > 0
            })
            .map(|(id, _)| *id);
        match oldest.and_then(|id| open.remove(&id)) {
            Some(state) => {
                state.cut.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Whether a review this large is decoded off the I/O workers.
pub fn is_heavy(estimate: u64, body: usize) -> bool {
    estimate >= HEAVY_ESTIMATE || body >= HEAVY_BODY
}

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// An object inside an array may become the largest struct a pod holds in a `Vec`: a `Volume` is
/// 3.2 KiB for `{"name":""}`, 12 bytes of JSON.
const OBJECT_IN_ARRAY: u64 = (max(
    size_of::<Volume>(),
    max(size_of::<Container>(), size_of::<EphemeralContainer>()),
) + 256) as u64;
/// Any other object: a map's allocation, or a struct held inline by its parent.
const OBJECT: u64 = 64;
/// An array element: a `String` or a `serde_json::Value` slot.
const ELEMENT: u64 = 48;
/// An object member: a map entry's key and value slots (struct fields cost less).
const MEMBER: u64 = 96;
/// The review's fixed parts (the `Pod` and `AdmissionRequest` structs, references, response).
const FIXED: u64 = 64 * 1024;
/// Nesting followed; serde_json refuses more than 128 levels, so deeper bodies fail to decode
/// anyway (and are estimated only up to here).
const MAX_DEPTH: usize = 256;

/// The shape of a JSON document, read in one streaming pass over its bytes (no allocation beyond
/// the nesting stack): enough to bound what decoding it will allocate.
#[derive(Debug, Default, Clone)]
pub struct Shape {
    /// Per open container: true for an array.
    stack: Vec<bool>,
    too_deep: usize,
    in_string: bool,
    escaped: bool,
    pub bytes: u64,
    pub objects_in_arrays: u64,
    pub objects: u64,
    pub elements: u64,
    pub members: u64,
    pub string_bytes: u64,
}

impl Shape {
    pub fn feed(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        let mut i = 0;
        while i < chunk.len() {
            if self.escaped {
                self.escaped = false;
                self.string_bytes += 1;
                i += 1;
                continue;
            }
            if self.in_string {
                match memchr::memchr2(b'"', b'\\', &chunk[i..]) {
                    None => {
                        self.string_bytes += (chunk.len() - i) as u64;
                        i = chunk.len();
                    }
                    Some(at) => {
                        self.string_bytes += at as u64;
                        i += at;
                        if chunk[i] == b'\\' {
                            self.escaped = true;
                            self.string_bytes += 1;
                        } else {
                            self.in_string = false;
                        }
                        i += 1;
                    }
                }
                continue;
            }
            match chunk[i] {
                b'"' => self.in_string = true,
                b'{' => {
                    if self.in_array() {
                        self.objects_in_arrays += 1;
                    } else {
                        self.objects += 1;
                    }
                    self.open(false);
                }
                b'[' => {
                    // Its first element (an empty array is counted as one: an upper bound).
                    self.elements += 1;
                    self.open(true);
                }
                b']' | b'}' => self.close(),
                b',' if self.in_array() => self.elements += 1,
                b':' => self.members += 1,
                _ => {}
            }
            i += 1;
        }
    }

    fn in_array(&self) -> bool {
        self.too_deep == 0 && self.stack.last() == Some(&true)
    }

    fn open(&mut self, array: bool) {
        if self.stack.len() < MAX_DEPTH {
            self.stack.push(array);
        } else {
            self.too_deep += 1;
        }
    }

    fn close(&mut self) {
        if self.too_deep > 0 {
            self.too_deep -= 1;
        } else {
            self.stack.pop();
        }
    }

    /// An upper bound of the memory the review takes once decoded, its body included.
    pub fn estimate(&self) -> u64 {
        self.objects_in_arrays
            .saturating_mul(OBJECT_IN_ARRAY)
            .saturating_add(self.objects.saturating_mul(OBJECT))
            .saturating_add(self.elements.saturating_mul(ELEMENT))
            .saturating_add(self.members.saturating_mul(MEMBER))
            .saturating_add(self.string_bytes)
            .saturating_add(self.bytes)
            .saturating_add(FIXED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(text: &str) -> Shape {
        let mut s = Shape::default();
        s.feed(text.as_bytes());
        s
    }

    #[test]
    fn counts_objects_elements_members_and_string_bytes() {
        let s = shape(r#"{"a":[{"n":"x,y"},{"n":"z\"]}"}],"b":["p","q"],"c":{}}"#);
        assert_eq!(s.objects_in_arrays, 2);
        assert_eq!(s.objects, 2);
        assert_eq!(s.elements, 4);
        assert_eq!(s.members, 5);
        // x,y + z\"]} (escapes counted raw) + the keys and values.
        assert!(s.string_bytes >= 10);
        assert_eq!(s.stack.len(), 0);
    }

    #[test]
    fn chunk_boundaries_change_nothing() {
        let text = r#"{"request":{"uid":"a\\b\"c","object":{"spec":{"volumes":[{"name":""},{"name":"[{"}]}}}}"#;
        let whole = shape(text);
        for split in 0..text.len() {
            let mut s = Shape::default();
            s.feed(&text.as_bytes()[..split]);
            s.feed(&text.as_bytes()[split..]);
            assert_eq!(
                (
                    s.objects_in_arrays,
                    s.objects,
                    s.elements,
                    s.members,
                    s.string_bytes
                ),
                (
                    whole.objects_in_arrays,
                    whole.objects,
                    whole.elements,
                    whole.members,
                    whole.string_bytes
                ),
                "split at {split}"
            );
        }
    }

    #[test]
    fn empty_volumes_are_estimated_at_their_decoded_size() {
        let n = 100_000;
        let body = format!(
            r#"{{"spec":{{"volumes":[{}]}}}}"#,
            vec![r#"{"name":""}"#; n].join(",")
        );
        let s = shape(&body);
        assert!(s.estimate() > (n * size_of::<Volume>()) as u64);
        // A plain pod stays small.
        let pod = include_str!("../../tests/fixtures/pods/spark35-driver-submit.json");
        assert!(
            shape(pod).estimate() < 1024 * 1024,
            "{}",
            shape(pod).estimate()
        );
    }

    #[test]
    fn nesting_beyond_the_depth_bound_keeps_counting_closes() {
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        let s = shape(&deep);
        assert_eq!(s.stack.len(), 0);
        assert_eq!(s.too_deep, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn budgets_refuse_what_cannot_fit_and_wait_briefly_for_the_rest() {
        let budgets = Budgets::new(100, 1000, 1);
        let soon = || Instant::now() + Duration::from_millis(50);
        let first = budgets.begin_upload();
        let mut held = None;
        budgets.upload(&mut held, 60, soon(), &first).await.unwrap();
        budgets.upload(&mut held, 40, soon(), &first).await.unwrap();
        // The first upload is young: it is not cut, and the second waits in vain.
        let second = budgets.begin_upload();
        let mut other = None;
        assert_eq!(
            budgets.upload(&mut other, 1, soon(), &second).await,
            Err(Shortfall::Busy)
        );
        assert_eq!(
            budgets.upload(&mut other, 101, soon(), &second).await,
            Err(Shortfall::TooLarge)
        );
        // Once it is old, a waiting upload cuts it: it learns so, and its budget goes to the other.
        tokio::time::advance(CUT_AGE).await;
        let waiting = budgets.upload(&mut other, 100, Instant::now() + BUDGET_WAIT, &second);
        let cut = async {
            first.state.cut.notified().await;
            drop(held);
        };
        let (got, ()) = tokio::join!(waiting, cut);
        got.unwrap();
        assert_eq!(
            budgets.decode(501, soon()).await.err(),
            Some(Shortfall::TooLarge),
            "one review takes at most half the decode budget"
        );
        let _half = budgets.decode(500, soon()).await.unwrap();
        let turn = budgets.heavy(soon()).await.unwrap();
        assert_eq!(budgets.heavy(soon()).await.err(), Some(Shortfall::Busy));
        // Two may wait for the one turn; a third is refused at once.
        let later = Instant::now() + Duration::from_secs(60);
        let (first, second) = (budgets.heavy(later), budgets.heavy(later));
        tokio::pin!(first, second);
        assert!(futures::poll!(&mut first).is_pending());
        assert!(futures::poll!(&mut second).is_pending());
        assert_eq!(budgets.heavy(later).await.err(), Some(Shortfall::Busy));
        drop(turn);
        assert!(first.await.is_ok());
    }
}
