//! Admission control for the API: a limit on requests served at once that adapts to the latency
//! the admitted requests see, so that an overloaded server answers the surplus at once with 503
//! `overloaded` instead of letting every request queue behind the others.
//!
//! The limit moves in windows of [`WINDOW`]. If more than half of the requests that finished in
//! a window (at least [`WINDOW_SAMPLES_MIN`] of them, or the limit if it is lower) took longer
//! than the target, a queue has formed that does not drain, and the limit shrinks by a tenth.
//! (CoDel watches the minimum: a burst raises the mean, only a standing queue raises the
//! minimum. Here service is not first come, first served: a request that arrives just before a
//! group commit is answered within a millisecond however long the queue, so under a 2× overload
//! the minimum stayed at 1–10 ms while the median was 19 ms; the median is the signal.)
//! Otherwise, if the window ever used the whole limit, the limit grows by one sixteenth (at
//! least one). It stays between a sixteenth of the configured `max_in_flight` (at least 4) and
//! `max_in_flight` itself.
//! `/health`, `/ready` and `/metrics` are never refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;

/// How often the limit is reconsidered.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Requests a window needs to have finished for its median to move the limit down (or the
/// limit, if lower).
pub const WINDOW_SAMPLES_MIN: u32 = 16;

#[derive(Debug)]
pub struct Admission {
    max: usize,
    floor: usize,
    target: Duration,
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    shed: AtomicU64,
    window: std::sync::Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    /// Requests finished in the window, and how many of them took longer than the target.
    finished: u32,
    slow: u32,
    /// Whether the window saw every slot taken.
    saturated: bool,
}

impl Window {
    fn new(started: Instant) -> Window {
        Window { started, finished: 0, slow: 0, saturated: false }
    }
}

/// A slot held by an admitted request; dropping it frees the slot.
#[derive(Debug)]
pub struct Permit<'a> {
    admission: &'a Admission,
    admitted: Instant,
}

impl Admission {
    /// `max`: the hard bound on requests at once; `target`: the latency above which a standing
    /// queue is assumed.
    pub fn new(max: usize, target: Duration, now: Instant) -> Admission {
        let max = max.max(1);
        Admission {
            max,
            floor: (max / 16).max(4).min(max),
            target,
            limit: AtomicUsize::new(max),
            in_flight: AtomicUsize::new(0),
            shed: AtomicU64::new(0),
            window: std::sync::Mutex::new(Window::new(now)),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests refused since the start.
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// A slot, or `None` when every slot of the current limit is taken.
    pub fn try_admit(&self, now: Instant) -> Option<Permit<'_>> {
        let limit = self.limit();
        let taken = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if taken >= limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.shed.fetch_add(1, Ordering::Relaxed);
            self.lock().saturated = true;
            return None;
        }
        if taken + 1 == limit {
            self.lock().saturated = true;
        }
        Some(Permit { admission: self, admitted: now })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records one admitted request's latency; at the end of a window, moves the limit.
    fn finished(&self, latency: Duration, now: Instant) {
        let mut window = self.lock();
        window.finished = window.finished.saturating_add(1);
        if latency > self.target {
            window.slow = window.slow.saturating_add(1);
        }
        if now.duration_since(window.started) < WINDOW {
            return;
        }
        let limit = self.limit();
        let enough = window.finished >= WINDOW_SAMPLES_MIN.min(u32::try_from(limit).unwrap_or(u32::MAX));
        let queued = enough && window.slow > window.finished / 2;
        let next = if queued {
            (limit - (limit / 10).max(1)).max(self.floor)
        } else if window.saturated {
            (limit + (limit / 16).max(1)).min(self.max)
        } else {
            limit
        };
        self.limit.store(next, Ordering::Relaxed);
        *window = Window::new(now);
    }
}

impl Permit<'_> {
    /// Frees the slot, counting the request's latency (up to `now`) towards the limit.
    pub fn finish(self, now: Instant) {
        self.admission.finished(now.saturating_duration_since(self.admitted), now);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The middleware: admits or refuses at once, before any parsing, authentication or work.
pub async fn admit(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(permit) = state.admission.try_admit(Instant::now()) else {
        metrics::counter!("qepik_http_shed_total").increment(1);
        let mut response =
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "the server is at capacity; retry")
                .into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let response = next.run(request).await;
    permit.finish(Instant::now());
    metrics::gauge!("qepik_http_admission_limit").set(state.admission.limit() as f64);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_millis(10);

    /// Runs one window in which `n` requests are admitted together and each takes `latency`
    /// (the last one ends the window, so it takes at least [`WINDOW`]).
    fn window(admission: &Admission, start: Instant, n: usize, latency: Duration) -> (usize, Instant) {
        let mut permits: Vec<Permit<'_>> = (0..n).map_while(|_| admission.try_admit(start)).collect();
        let admitted = permits.len();
        let end = start + WINDOW.max(latency);
        let last = permits.pop().expect("at least one admitted");
        for permit in permits {
            permit.finish(start + latency);
        }
        last.finish(end);
        (admitted, end)
    }

    #[test]
    fn refuses_beyond_the_limit_and_frees_slots_when_requests_end() {
        let now = Instant::now();
        let admission = Admission::new(2, TARGET, now);
        let first = admission.try_admit(now).expect("a free slot");
        let _second = admission.try_admit(now).expect("a free slot");
        assert!(admission.try_admit(now).is_none());
        assert_eq!(admission.shed(), 1);
        first.finish(now);
        assert_eq!(admission.in_flight(), 1);
        assert!(admission.try_admit(now).is_some());
    }

    #[test]
    fn a_standing_queue_shrinks_the_limit_down_to_the_floor_and_a_fast_one_grows_it_back() {
        let mut now = Instant::now();
        let admission = Admission::new(100, TARGET, now);
        // Every request, even the fastest, over the target: a tenth off per window.
        let mut limits = Vec::new();
        for _ in 0..40 {
            let (admitted, end) = window(&admission, now, 1_000, Duration::from_millis(50));
            assert_eq!(admitted, limits.last().copied().unwrap_or(100));
            limits.push(admission.limit());
            now = end;
        }
        assert_eq!(&limits[..3], &[90, 81, 73]);
        assert_eq!(&limits[25..29], &[10, 9, 8, 7], "a tenth, at least one");
        assert_eq!(admission.limit(), 6, "the floor: a sixteenth of 100, at least 4");
        // Fast and saturated: grows by a sixteenth, at least one, up to the maximum.
        for _ in 0..200 {
            now = window(&admission, now, 1_000, Duration::from_millis(1)).1;
        }
        assert_eq!(admission.limit(), 100);
    }

    #[test]
    fn a_window_whose_median_is_fast_or_that_saw_too_few_requests_leaves_the_limit_alone() {
        let now = Instant::now();
        let admission = Admission::new(50, TARGET, now);
        // 25 slow and 25 fast: not more than half slow. (The last to finish ends the window.)
        let end = now + WINDOW;
        let finish = |fast: usize, slow: usize, admission: &Admission| {
            let fast: Vec<Permit<'_>> = (0..fast).map_while(|_| admission.try_admit(now)).collect();
            let mut slow: Vec<Permit<'_>> = (0..slow).map_while(|_| admission.try_admit(now)).collect();
            let last = slow.pop().expect("one slow");
            for permit in fast {
                permit.finish(now + Duration::from_millis(1));
            }
            for permit in slow {
                permit.finish(now + Duration::from_millis(50));
            }
            last.finish(end);
        };
        finish(25, 25, &admission);
        assert_eq!(admission.limit(), 50, "the median was under the target; at the maximum already");
        // 15 requests, all slow: too few to judge (under a limit of 50).
        let admission = Admission::new(50, TARGET, now);
        let (_, _) = window(&admission, now, 15, Duration::from_millis(50));
        assert_eq!(admission.limit(), 50);
        // A standing queue that a few lucky requests beat (the minimum would miss it).
        let admission = Admission::new(50, TARGET, now);
        finish(5, 45, &admission);
        assert_eq!(admission.limit(), 45, "most were slow: a tenth off");
        // A quiet window (never saturated, fast): unchanged.
        let admission = Admission::new(50, TARGET, now);
        let (_, _) = window(&admission, now, 3, Duration::from_millis(1));
        assert_eq!(admission.limit(), 50);
    }
}
