//! The Envoy RLS v3 gRPC service: a thin adapter from tonic to [`RateLimiter`].
//!
//! It owns the mapping of errors to gRPC status codes and nothing else: a malformed request
//! is `INVALID_ARGUMENT` with the reason, a store failure `UNAVAILABLE` (so Envoy's
//! `failure_mode_deny` decides).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{RateLimiter, RequestError};
use crate::proto::rls::rate_limit_service_server::RateLimitService;
use crate::proto::rls::{RateLimitRequest, RateLimitResponse};

#[derive(Clone)]
pub struct GrpcService {
    limiter: Arc<RateLimiter>,
}

impl GrpcService {
    pub fn new(limiter: Arc<RateLimiter>) -> Self {
        Self { limiter }
    }
}

#[tonic::async_trait]
impl RateLimitService for GrpcService {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        match self.limiter.should_rate_limit(request.get_ref()).await {
            Ok(response) => Ok(Response::new(response)),
            Err(RequestError::Invalid(message)) => Err(Status::invalid_argument(message)),
            Err(RequestError::Store(e)) => Err(Status::unavailable(e.to_string())),
            Err(e @ RequestError::Overloaded(_)) => Err(Status::resource_exhausted(e.to_string())),
        }
    }
}
