//! Connection bookkeeping: the open-file limit, how many connections each port may hold, which of
//! them are idle, and which one to evict when the cap is reached.
//!
//! A connection is *active* while one of its requests is being handled, *idle* otherwise (which
//! includes the TLS handshake and the wait for headers, both bounded by the header timeout). At
//! the cap, a new connection evicts an idle one (HTTP/2: GOAWAY, so the API server moves to a new
//! connection without losing a request): first the oldest of those that never had a request (a
//! flood of handshakes or of silent connections), then the one idle longest; only when every
//! connection is active is the new one closed at once. Active requests are bounded in time by the body
//! timeout and the engine's budget, so the cap frees up.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
// Tokio's clock (the same as std's, except that tests can pause it).
use tokio::time::Instant;

/// File descriptors the process may open, and how many are open now.
#[derive(Debug, Clone, Copy)]
pub struct FdLimit {
    /// The soft `RLIMIT_NOFILE`; `None`: unlimited.
    pub limit: Option<u64>,
    /// Open when read (listeners, the runtime, log and client sockets).
    pub open: u64,
}

impl FdLimit {
    /// Raises the soft limit to the hard one (as Go's runtime does; the default soft limit of 1,024
    /// is a legacy of `select`), then reads both limits and the descriptors open now.
    pub fn raise_and_read() -> Self {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
        if current != maximum {
            // Failure keeps the soft limit, which is then what is read below.
            let _ = setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: maximum,
                    maximum,
                },
            );
        }
        Self::read()
    }

    /// The soft limit and the descriptors open now, without changing anything.
    pub fn read() -> Self {
        use rustix::process::{Resource, getrlimit};
        let limit = getrlimit(Resource::Nofile).current;
        let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        Self { limit, open }
    }

    /// Connections that fit under the limit while `reserve` descriptors stay free for everything
    /// else (the admin port, certificate reloads, the Kubernetes and Vault clients).
    pub fn room(&self, reserve: usize) -> usize {
        match self.limit {
            None => usize::MAX,
            Some(limit) => {
                let free = limit.saturating_sub(self.open + reserve as u64);
                usize::try_from(free).unwrap_or(usize::MAX)
            }
        }
    }
}

/// The caps of one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// At this many open connections, a new one evicts the longest idle.
    pub soft: usize,
    /// Beyond this many (evicted ones still closing), new connections are closed at once.
    pub hard: usize,
}

impl Caps {
    /// `max` connections, fewer if the descriptors (`room`) do not allow it; the margin for
    /// connections still closing after eviction comes out of `slack` descriptors of the reserve.
    pub fn new(max: usize, room: usize, slack: usize) -> Self {
        let soft = max.min(room).max(1);
        let margin = (soft / 8).clamp(1, slack.max(1));
        Self {
            soft,
            hard: soft + margin,
        }
    }
}

/// The open connections of one port.
pub struct Connections {
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    caps: Caps,
    epoch: Instant,
}

/// What one connection shares with the bookkeeping.
pub struct Conn {
    active: AtomicUsize,
    /// Milliseconds after `epoch` when the last request ended (or the connection opened).
    idle_since: AtomicU64,
    /// Has had a request: such connections (the API server's) are evicted after the others.
    served: AtomicBool,
    evict: Notify,
    evicted: AtomicBool,
    epoch: Instant,
}

/// Keeps a connection on the books until dropped (when its task ends).
pub struct Registration {
    connections: Arc<Connections>,
    id: u64,
    pub conn: Arc<Conn>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

impl Connections {
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            caps,
            epoch: Instant::now(),
        })
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // The map is only ever inserted into and removed from: a poisoned one is still whole.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Open connections (evicted ones still closing included).
    pub fn open(&self) -> usize {
        self.lock().len()
    }

    /// Puts a newly accepted connection on the books, evicting the longest idle one at the cap;
    /// `None` when it must be closed at once (every connection is active, or too many are still
    /// closing).
    pub fn admit(self: &Arc<Self>) -> Option<Registration> {
        let mut open = self.lock();
        if open.len() >= self.caps.hard {
            return None;
        }
        if open.len() >= self.caps.soft && !evict_longest_idle(&open) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            active: AtomicUsize::new(0),
            idle_since: AtomicU64::new(millis_since(self.epoch)),
            served: AtomicBool::new(false),
            evict: Notify::new(),
            evicted: AtomicBool::new(false),
            epoch: self.epoch,
        });
        open.insert(id, conn.clone());
        Some(Registration {
            connections: self.clone(),
            id,
            conn,
        })
    }

    /// Asks the longest idle connection to close (e.g. when `accept` runs out of descriptors);
    /// false when none is idle.
    pub fn evict_one(&self) -> bool {
        evict_longest_idle(&self.lock())
    }
}

fn evict_longest_idle(open: &HashMap<u64, Arc<Conn>>) -> bool {
    let victim = open
        .values()
        .filter(|c| c.active.load(Ordering::Acquire) == 0 && !c.evicted.load(Ordering::Acquire))
        .min_by_key(|c| {
            (
                c.served.load(Ordering::Acquire),
                c.idle_since.load(Ordering::Acquire),
            )
        });
    match victim {
        Some(conn) => {
            conn.evicted.store(true, Ordering::Release);
            conn.evict.notify_one();
            true
        }
        None => false,
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Conn {
    /// Marks a request as being handled until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        Active(self.clone())
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves once the connection is asked to make room.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// Resolves once no request has been handled for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        loop {
            let wait = if self.active() == 0 {
                let since = Duration::from_millis(self.idle_since.load(Ordering::Acquire));
                let idle = self.epoch.elapsed().saturating_sub(since);
                match timeout.checked_sub(idle) {
                    None | Some(Duration::ZERO) => return,
                    Some(left) => left,
                }
            } else {
                // Checked again soon: a connection closes within 1.25 idle timeouts of its last
                // request.
                timeout / 4
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A request being handled; the connection counts as idle again once every one is dropped.
pub struct Active(Arc<Conn>);

impl Drop for Active {
    fn drop(&mut self) {
        let conn = &self.0;
        conn.idle_since
            .store(millis_since(conn.epoch), Ordering::Release);
        conn.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_follow_the_descriptors() {
        let fds = FdLimit {
            limit: Some(1024),
            open: 24,
        };
        assert_eq!(fds.room(128), 872);
        assert_eq!(Caps::new(512, fds.room(128), 32).soft, 512);
        let tight = Caps::new(2000, fds.room(128), 32);
        assert_eq!(tight.soft, 872);
        assert!(tight.hard > tight.soft && tight.hard <= tight.soft + 32);
        let unlimited = FdLimit {
            limit: None,
            open: 10,
        };
        assert_eq!(Caps::new(512, unlimited.room(128), 32).soft, 512);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_that_never_had_a_request_go_first() {
        let connections = Connections::new(Caps { soft: 2, hard: 4 });
        let served = connections.admit().unwrap();
        drop(served.conn.begin());
        tokio::time::advance(Duration::from_millis(10)).await;
        let fresh = connections.admit().unwrap();
        // The served one has been idle longer, but the fresh one never had a request.
        let _third = connections.admit().unwrap();
        assert!(fresh.conn.evicted.load(Ordering::Acquire));
        assert!(!served.conn.evicted.load(Ordering::Acquire));
    }

    #[tokio::test(start_paused = true)]
    async fn the_longest_idle_connection_is_evicted_and_active_ones_never() {
        let connections = Connections::new(Caps { soft: 2, hard: 3 });
        let first = connections.admit().unwrap();
        tokio::time::advance(Duration::from_millis(10)).await;
        let second = connections.admit().unwrap();
        // The first is busy: the second, though newer, is the one evicted.
        let busy = first.conn.begin();
        let third = connections.admit().unwrap();
        assert!(second.conn.evicted.load(Ordering::Acquire));
        assert!(!first.conn.evicted.load(Ordering::Acquire));
        // The evicted one is still closing: the hard cap holds, and nothing else is idle.
        assert_eq!(connections.open(), 3);
        assert!(connections.admit().is_none());
        drop(second);
        // Now the third is idle and evictable; the first stays while busy.
        let fourth = connections.admit().unwrap();
        assert!(third.conn.evicted.load(Ordering::Acquire));
        drop((third, fourth));
        drop(busy);
        assert_eq!(first.conn.active(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timer_restarts_with_each_request() {
        let connections = Connections::new(Caps { soft: 4, hard: 5 });
        let reg = connections.admit().unwrap();
        let conn = reg.conn.clone();
        let started = tokio::time::Instant::now();
        let request = conn.begin();
        let timer = tokio::spawn({
            let conn = conn.clone();
            async move { conn.idle_for(Duration::from_secs(60)).await }
        });
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(!timer.is_finished(), "a busy connection is not idle");
        drop(request);
        timer.await.unwrap();
        assert!(started.elapsed() >= Duration::from_secs(160));
    }
}
