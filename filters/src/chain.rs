//! The [`Filter`] trait and the [`Chain`] that runs filters in order.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{Ctx, GatewayError, RequestHead};

/// One concern of the request path (auth, limits, pricing, routing, ...).
///
/// Every phase has a default that does nothing, so a filter implements only what it needs.
/// A filter that returns an error stops the chain; the error is what the client sees.
#[async_trait]
pub trait Filter: Send + Sync {
    /// A short stable name, used in logs and metrics.
    fn name(&self) -> &'static str;

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

    /// When the exchange is over, however it ended. Runs in reverse order; cannot fail.
    async fn on_done(&self, _ctx: &mut Ctx) {}

    /// The request was dropped without `on_done` (its task panicked or was cancelled):
    /// give back what it held. Synchronous, because it runs from `Drop`.
    fn on_abandon(&self, _ctx: &mut Ctx) {}
}

/// The ordered filters. Built once at start-up; shared by every request.
#[derive(Clone, Default)]
pub struct Chain {
    filters: Vec<Arc<dyn Filter>>,
}

impl Chain {
    pub fn new(filters: Vec<Arc<dyn Filter>>) -> Self {
        Chain { filters }
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.filters.iter().map(|f| f.name()).collect()
    }

    pub async fn request_head(
        &self,
        ctx: &mut Ctx,
        head: &RequestHead<'_>,
    ) -> Result<(), GatewayError> {
        for f in &self.filters {
            f.on_request_head(ctx, head).await?;
        }
        Ok(())
    }

    pub async fn request_body(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        for f in &self.filters {
            f.on_request_body(ctx).await?;
        }
        Ok(())
    }

    pub async fn done(&self, ctx: &mut Ctx) {
        for f in self.filters.iter().rev() {
            f.on_done(ctx).await;
        }
    }

    pub fn abandon(&self, ctx: &mut Ctx) {
        for f in self.filters.iter().rev() {
            f.on_abandon(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Rec(&'static str, Arc<Mutex<Vec<String>>>, bool);

    #[async_trait]
    impl Filter for Rec {
        fn name(&self) -> &'static str {
            self.0
        }
        async fn on_request_body(&self, _ctx: &mut Ctx) -> Result<(), GatewayError> {
            self.1.lock().unwrap().push(format!("body:{}", self.0));
            if self.2 {
                return Err(GatewayError::IpNotAllowed);
            }
            Ok(())
        }
        async fn on_done(&self, _ctx: &mut Ctx) {
            self.1.lock().unwrap().push(format!("done:{}", self.0));
        }
    }

    #[tokio::test]
    async fn runs_in_order_stops_at_first_error_and_finishes_in_reverse() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let chain = Chain::new(vec![
            Arc::new(Rec("a", log.clone(), false)),
            Arc::new(Rec("b", log.clone(), true)),
            Arc::new(Rec("c", log.clone(), false)),
        ]);
        let mut ctx = Ctx::new("req-1".into());
        let err = chain.request_body(&mut ctx).await.unwrap_err();
        assert_eq!(err, GatewayError::IpNotAllowed);
        chain.done(&mut ctx).await;
        assert_eq!(
            *log.lock().unwrap(),
            ["body:a", "body:b", "done:c", "done:b", "done:a"]
        );
    }
}
