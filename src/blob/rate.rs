//! Byte-rate limits of blob transfer (`upload_rate`, `download_rate` in
//! `[sync]`): token buckets the serving and fetching sides wait on.

use std::num::NonZeroU32;
use std::sync::Arc;

/// A byte-rate limit: a token bucket of 1 KiB cells holding one second.
pub struct Limiter {
    bucket: governor::DefaultDirectRateLimiter,
    burst: u32,
}

/// The limit for `rate` bytes per second (`None`: unlimited, for 0 or a
/// rate under 1 KiB/s).
pub(super) fn limiter(rate: u64) -> Option<Arc<Limiter>> {
    let kib = u32::try_from(rate / 1024).unwrap_or(u32::MAX);
    NonZeroU32::new(kib).map(|r| {
        Arc::new(Limiter {
            bucket: governor::RateLimiter::direct(governor::Quota::per_second(r)),
            burst: r.get(),
        })
    })
}

/// Wait until `bytes` may pass.
pub(super) async fn take(l: &Option<Arc<Limiter>>, bytes: u64) {
    let Some(l) = l else { return };
    let mut kib = bytes.div_ceil(1024);
    while kib > 0 {
        let step = kib.min(u64::from(l.burst));
        if let Some(n) = NonZeroU32::new(step as u32) {
            if l.bucket.until_n_ready(n).await.is_err() {
                return;
            }
        }
        kib -= step;
    }
}
