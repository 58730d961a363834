//! The [`Filter`] trait, its phases, and the [`Chain`] that runs filters through them.
//!
//! An exchange goes through these phases, in this order:
//!
//! ```text
//! on_request_head    forward   before the body is read (cheap refusals)
//! on_request_body    forward   after one parse of the body into ctx.facts
//! on_attempt_start   forward   before each upstream attempt (may refuse the attempt)
//! on_attempt_end     reverse   after each upstream attempt, with its outcome
//! on_response_head   reverse   the upstream's 2xx head, before the client sees it
//! on_chunk           reverse   every response body chunk, and once more at the end
//! on_done            reverse   the exchange is over, however it ended
//! on_abandon         reverse   the request was dropped before on_done
//! ```
//!
//! Response phases run in reverse, as in Pingora's and praxis's module conventions: the
//! filter nearest the provider (last in the chain) sees the response first. A filter says
//! which phases it implements ([`Filter::phases`]); the chain builds one list per phase at
//! start-up, so a phase a filter does not implement costs nothing (no call, no boxed future).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_http::ResponseHeader;

use crate::channel::Channel;
use crate::{Ctx, GatewayError, RequestHead};

/// A set of phases, as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Phases(u8);

impl Phases {
    pub const NONE: Phases = Phases(0);
    pub const REQUEST_HEAD: Phases = Phases(1);
    pub const REQUEST_BODY: Phases = Phases(1 << 1);
    pub const ATTEMPT_START: Phases = Phases(1 << 2);
    pub const ATTEMPT_END: Phases = Phases(1 << 3);
    pub const RESPONSE_HEAD: Phases = Phases(1 << 4);
    pub const CHUNK: Phases = Phases(1 << 5);
    pub const DONE: Phases = Phases(1 << 6);
    pub const ABANDON: Phases = Phases(1 << 7);

    pub const fn with(self, other: Phases) -> Phases {
        Phases(self.0 | other.0)
    }

    pub const fn contains(self, other: Phases) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Phases {
    type Output = Phases;
    fn bitor(self, rhs: Phases) -> Phases {
        self.with(rhs)
    }
}

/// One upstream attempt, as `on_attempt_start` and `on_attempt_end` see it.
pub struct Attempt<'a> {
    pub channel: &'a Channel,
    /// 1 for the first attempt of the request.
    pub number: u32,
}

/// How an upstream attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The provider answered with this status (after any 1xx).
    Status(u16),
    /// No address for the channel yet.
    Unresolved,
    /// Could not connect or complete the TLS handshake.
    Connect,
    /// The connection, the write or the response head timed out.
    Timeout,
    /// The connection failed while sending or reading the head.
    Io,
}

impl AttemptOutcome {
    /// Whether the outcome speaks against the channel's health: the provider failed, not
    /// the request. 4xx other than 401/403/429 are the caller's doing.
    pub fn is_channel_failure(self) -> bool {
        match self {
            AttemptOutcome::Status(s) => matches!(s, 401 | 403 | 429) || s >= 500,
            _ => true,
        }
    }

    /// A low-cardinality label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            AttemptOutcome::Status(200..=299) => "ok",
            AttemptOutcome::Status(429) => "status_429",
            AttemptOutcome::Status(401 | 403) => "status_auth",
            AttemptOutcome::Status(500..=599) => "status_5xx",
            AttemptOutcome::Status(_) => "status_4xx",
            AttemptOutcome::Unresolved => "unresolved",
            AttemptOutcome::Connect => "connect_error",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Io => "io_error",
        }
    }
}

/// One concern of the request path (auth, limits, pricing, routing, usage, ...).
///
/// Every phase has a default that does nothing; a filter implements what it needs and lists
/// those phases in [`Filter::phases`]. A request phase that returns an error stops the
/// chain, and the error is what the client sees.
#[async_trait]
pub trait Filter: Send + Sync {
    /// A short stable name, used in logs.
    fn name(&self) -> &'static str;

    /// The phases this filter implements. Only these are called.
    fn phases(&self) -> Phases;

    /// After the request head is read and before the body is: cheap refusals go here so a
    /// flood of bad requests never costs a body read.
    async fn on_request_head(
        &self,
        _ctx: &mut Ctx,
        _head: &RequestHead<'_>,
    ) -> Result<(), GatewayError> {
        Ok(())
    }

    /// After the body is read and its facts parsed into `ctx.facts`.
    async fn on_request_body(&self, _ctx: &mut Ctx) -> Result<(), GatewayError> {
        Ok(())
    }

    /// Before an upstream attempt. An error skips this attempt (the relay moves on to the
    /// next planned channel, and reports the error if it was the last).
    async fn on_attempt_start(
        &self,
        _ctx: &mut Ctx,
        _attempt: &Attempt<'_>,
    ) -> Result<(), GatewayError> {
        Ok(())
    }

    /// After an upstream attempt that was started, with how it ended.
    fn on_attempt_end(&self, _ctx: &mut Ctx, _attempt: &Attempt<'_>, _outcome: AttemptOutcome) {}

    /// The provider's 2xx response head, about to be sent to the client. Headers may be
    /// added or removed here.
    fn on_response_head(&self, _ctx: &mut Ctx, _head: &mut ResponseHeader) {}

    /// One response body chunk on its way to the client; it may be rewritten (emptied, to
    /// hold bytes back). Called once more with `end` set and an empty chunk when the body is
    /// complete, so held-back bytes can be released. Synchronous: it runs per chunk.
    fn on_chunk(&self, _ctx: &mut Ctx, _chunk: &mut Bytes, _end: bool) {}

    /// When the exchange is over, however it ended. Cannot fail.
    async fn on_done(&self, _ctx: &mut Ctx) {}

    /// The request was dropped without `on_done` (its task panicked or was cancelled):
    /// give back what it held. Synchronous, because it runs from `Drop`.
    fn on_abandon(&self, _ctx: &mut Ctx) {}
}

type List = Box<[Arc<dyn Filter>]>;

/// The filters, one list per phase, built once at start-up and shared by every request.
/// Response-phase lists are stored already reversed.
#[derive(Clone, Default)]
pub struct Chain {
    names: Vec<&'static str>,
    request_head: List,
    request_body: List,
    attempt_start: List,
    attempt_end: List,
    response_head: List,
    chunk: List,
    done: List,
    abandon: List,
}

impl Chain {
    /// `filters` in request order.
    pub fn new(filters: Vec<Arc<dyn Filter>>) -> Self {
        let pick = |p: Phases, reverse: bool| -> List {
            let mut v: Vec<_> = filters
                .iter()
                .filter(|f| f.phases().contains(p))
                .cloned()
                .collect();
            if reverse {
                v.reverse();
            }
            v.into_boxed_slice()
        };
        Chain {
            names: filters.iter().map(|f| f.name()).collect(),
            request_head: pick(Phases::REQUEST_HEAD, false),
            request_body: pick(Phases::REQUEST_BODY, false),
            attempt_start: pick(Phases::ATTEMPT_START, false),
            attempt_end: pick(Phases::ATTEMPT_END, true),
            response_head: pick(Phases::RESPONSE_HEAD, true),
            chunk: pick(Phases::CHUNK, true),
            done: pick(Phases::DONE, true),
            abandon: pick(Phases::ABANDON, true),
        }
    }

    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    pub async fn request_head(
        &self,
        ctx: &mut Ctx,
        head: &RequestHead<'_>,
    ) -> Result<(), GatewayError> {
        for f in self.request_head.iter() {
            f.on_request_head(ctx, head).await?;
        }
        Ok(())
    }

    pub async fn request_body(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        for f in self.request_body.iter() {
            f.on_request_body(ctx).await?;
        }
        Ok(())
    }

    /// Runs `on_attempt_start` in order; the first refusal skips the attempt. What a filter
    /// takes for an attempt lives in the context, so a skipped attempt holds nothing.
    pub async fn attempt_start(
        &self,
        ctx: &mut Ctx,
        attempt: &Attempt<'_>,
    ) -> Result<(), GatewayError> {
        for f in self.attempt_start.iter() {
            f.on_attempt_start(ctx, attempt).await?;
        }
        Ok(())
    }

    pub fn attempt_end(&self, ctx: &mut Ctx, attempt: &Attempt<'_>, outcome: AttemptOutcome) {
        for f in self.attempt_end.iter() {
            f.on_attempt_end(ctx, attempt, outcome);
        }
    }

    pub fn response_head(&self, ctx: &mut Ctx, head: &mut ResponseHeader) {
        for f in self.response_head.iter() {
            f.on_response_head(ctx, head);
        }
    }

    /// Passes one chunk through every `on_chunk`, nearest the provider first.
    pub fn chunk(&self, ctx: &mut Ctx, chunk: &mut Bytes, end: bool) {
        for f in self.chunk.iter() {
            f.on_chunk(ctx, chunk, end);
        }
    }

    /// Whether any filter looks at body chunks (when none does, the relay skips the call).
    pub fn has_chunk_filters(&self) -> bool {
        !self.chunk.is_empty()
    }

    pub async fn done(&self, ctx: &mut Ctx) {
        for f in self.done.iter() {
            f.on_done(ctx).await;
        }
    }

    pub fn abandon(&self, ctx: &mut Ctx) {
        for f in self.abandon.iter() {
            f.on_abandon(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::test_channel;
    use std::sync::Mutex;

    type Log = Arc<Mutex<Vec<String>>>;

    /// Records every phase it is called in; implements only `phases`.
    struct Rec {
        name: &'static str,
        phases: Phases,
        log: Log,
        fail_body: bool,
    }

    impl Rec {
        fn push(&self, phase: &str) {
            self.log
                .lock()
                .unwrap()
                .push(format!("{phase}:{}", self.name));
        }
    }

    #[async_trait]
    impl Filter for Rec {
        fn name(&self) -> &'static str {
            self.name
        }
        fn phases(&self) -> Phases {
            self.phases
        }
        async fn on_request_head(
            &self,
            _ctx: &mut Ctx,
            _head: &RequestHead<'_>,
        ) -> Result<(), GatewayError> {
            self.push("head");
            Ok(())
        }
        async fn on_request_body(&self, _ctx: &mut Ctx) -> Result<(), GatewayError> {
            self.push("body");
            if self.fail_body {
                return Err(GatewayError::IpNotAllowed);
            }
            Ok(())
        }
        async fn on_attempt_start(
            &self,
            _ctx: &mut Ctx,
            _a: &Attempt<'_>,
        ) -> Result<(), GatewayError> {
            self.push("attempt_start");
            Ok(())
        }
        fn on_attempt_end(&self, _ctx: &mut Ctx, _a: &Attempt<'_>, _o: AttemptOutcome) {
            self.push("attempt_end");
        }
        fn on_response_head(&self, _ctx: &mut Ctx, _h: &mut ResponseHeader) {
            self.push("response_head");
        }
        fn on_chunk(&self, _ctx: &mut Ctx, chunk: &mut Bytes, _end: bool) {
            self.push("chunk");
            // Each filter tags the chunk, so the order it passed through shows in the bytes.
            let mut v = chunk.to_vec();
            v.extend_from_slice(self.name.as_bytes());
            *chunk = Bytes::from(v);
        }
        async fn on_done(&self, _ctx: &mut Ctx) {
            self.push("done");
        }
        fn on_abandon(&self, _ctx: &mut Ctx) {
            self.push("abandon");
        }
    }

    const ALL: Phases = Phases(0xff);

    fn rec(name: &'static str, phases: Phases, log: &Log) -> Arc<dyn Filter> {
        Arc::new(Rec {
            name,
            phases,
            log: log.clone(),
            fail_body: false,
        })
    }

    fn take(log: &Log) -> Vec<String> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    fn head() -> (http::Method, http::HeaderMap) {
        (http::Method::POST, http::HeaderMap::new())
    }

    #[tokio::test]
    async fn request_phases_run_forward_and_response_phases_in_reverse() {
        let log = Log::default();
        let chain = Chain::new(vec![
            rec("a", ALL, &log),
            rec("b", ALL, &log),
            rec("c", ALL, &log),
        ]);
        let mut ctx = Ctx::new("req-1".into());
        let (m, h) = head();
        let rh = RequestHead {
            method: &m,
            path: "/v1/x",
            headers: &h,
            client_ip: None,
        };
        chain.request_head(&mut ctx, &rh).await.unwrap();
        assert_eq!(take(&log), ["head:a", "head:b", "head:c"]);
        chain.request_body(&mut ctx).await.unwrap();
        assert_eq!(take(&log), ["body:a", "body:b", "body:c"]);
        let ch = test_channel("ch");
        let at = Attempt {
            channel: &ch,
            number: 1,
        };
        chain.attempt_start(&mut ctx, &at).await.unwrap();
        assert_eq!(
            take(&log),
            ["attempt_start:a", "attempt_start:b", "attempt_start:c"]
        );
        chain.attempt_end(&mut ctx, &at, AttemptOutcome::Status(200));
        assert_eq!(
            take(&log),
            ["attempt_end:c", "attempt_end:b", "attempt_end:a"]
        );
        let mut resp = ResponseHeader::build(200, None).unwrap();
        chain.response_head(&mut ctx, &mut resp);
        assert_eq!(
            take(&log),
            ["response_head:c", "response_head:b", "response_head:a"]
        );
        let mut chunk = Bytes::from_static(b">");
        chain.chunk(&mut ctx, &mut chunk, false);
        assert_eq!(take(&log), ["chunk:c", "chunk:b", "chunk:a"]);
        assert_eq!(&chunk[..], b">cba", "the chunk passed c, then b, then a");
        chain.done(&mut ctx).await;
        assert_eq!(take(&log), ["done:c", "done:b", "done:a"]);
        chain.abandon(&mut ctx);
        assert_eq!(take(&log), ["abandon:c", "abandon:b", "abandon:a"]);
    }

    #[tokio::test]
    async fn a_filter_is_called_only_in_the_phases_it_declares() {
        let log = Log::default();
        let chain = Chain::new(vec![
            rec("only_body", Phases::REQUEST_BODY, &log),
            rec("only_chunk", Phases::CHUNK | Phases::DONE, &log),
            rec("nothing", Phases::NONE, &log),
        ]);
        let mut ctx = Ctx::new("req-1".into());
        let (m, h) = head();
        let rh = RequestHead {
            method: &m,
            path: "/v1/x",
            headers: &h,
            client_ip: None,
        };
        chain.request_head(&mut ctx, &rh).await.unwrap();
        chain.request_body(&mut ctx).await.unwrap();
        let ch = test_channel("ch");
        let at = Attempt {
            channel: &ch,
            number: 1,
        };
        chain.attempt_start(&mut ctx, &at).await.unwrap();
        chain.attempt_end(&mut ctx, &at, AttemptOutcome::Timeout);
        let mut resp = ResponseHeader::build(200, None).unwrap();
        chain.response_head(&mut ctx, &mut resp);
        let mut chunk = Bytes::new();
        chain.chunk(&mut ctx, &mut chunk, true);
        chain.done(&mut ctx).await;
        chain.abandon(&mut ctx);
        assert_eq!(
            take(&log),
            ["body:only_body", "chunk:only_chunk", "done:only_chunk"]
        );
        assert!(chain.has_chunk_filters());
        assert_eq!(chain.names(), ["only_body", "only_chunk", "nothing"]);
    }

    #[tokio::test]
    async fn a_request_phase_error_stops_the_chain_and_done_still_runs_in_reverse() {
        let log = Log::default();
        let chain = Chain::new(vec![
            rec("a", ALL, &log),
            Arc::new(Rec {
                name: "b",
                phases: ALL,
                log: log.clone(),
                fail_body: true,
            }),
            rec("c", ALL, &log),
        ]);
        let mut ctx = Ctx::new("req-1".into());
        let err = chain.request_body(&mut ctx).await.unwrap_err();
        assert_eq!(err, GatewayError::IpNotAllowed);
        chain.done(&mut ctx).await;
        assert_eq!(
            take(&log),
            ["body:a", "body:b", "done:c", "done:b", "done:a"]
        );
    }

    #[test]
    fn attempt_outcomes_that_count_against_a_channel() {
        for s in [401, 403, 429, 500, 503] {
            assert!(AttemptOutcome::Status(s).is_channel_failure(), "{s}");
        }
        for s in [200, 400, 404, 413, 422] {
            assert!(!AttemptOutcome::Status(s).is_channel_failure(), "{s}");
        }
        assert!(AttemptOutcome::Connect.is_channel_failure());
    }
}
