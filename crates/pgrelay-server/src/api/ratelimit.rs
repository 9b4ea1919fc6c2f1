//! Token buckets: connection attempts per IP address, and frames per
//! connection. A bucket holds up to `burst` tokens and gains `rate` a
//! second; an action that finds it empty is refused.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets kept per IP before full (idle) ones are dropped.
const PRUNE_ABOVE: usize = 4096;

#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f32,
    last: Instant,
}

impl TokenBucket {
    #[allow(
        clippy::cast_precision_loss,
        reason = "a token count kept as f32 to keep the bucket small; bursts past 2^24 lose only fractions"
    )]
    pub fn full(burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst as f32,
            last: now,
        }
    }

    /// Takes one token; `false` when there is none. A rate of 0 never limits.
    #[allow(
        clippy::cast_possible_truncation,
        reason = "at most `burst` (a u32), held as f32 like every token count"
    )]
    pub fn take(&mut self, rate: f64, burst: u32, now: Instant) -> bool {
        if rate <= 0.0 {
            return true;
        }
        let gained = now.saturating_duration_since(self.last).as_secs_f64() * rate;
        self.tokens = (f64::from(self.tokens) + gained).min(f64::from(burst)) as f32;
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, rate: f64, burst: u32, now: Instant) -> bool {
        let gained = now.saturating_duration_since(self.last).as_secs_f64() * rate;
        f64::from(self.tokens) + gained >= f64::from(burst)
    }
}

/// One bucket per client address.
pub struct IpLimiter {
    rate: f64,
    burst: u32,
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl IpLimiter {
    pub fn new(rate: f64, burst: u32) -> IpLimiter {
        IpLimiter {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` may make another attempt now.
    pub fn allow(&self, ip: IpAddr) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut buckets = match self.buckets.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if buckets.len() > PRUNE_ABOVE {
            // A full bucket is the same as no bucket: forget those.
            buckets.retain(|_, b| !b.is_full(self.rate, self.burst, now));
        }
        buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::full(self.burst, now))
            .take(self.rate, self.burst, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::full(3, start);
        assert!((0..3).all(|_| bucket.take(10.0, 3, start)));
        assert!(!bucket.take(10.0, 3, start));
        // 10 a second: one more token after 100 ms.
        let later = start + Duration::from_millis(100);
        assert!(bucket.take(10.0, 3, later));
        assert!(!bucket.take(10.0, 3, later));
        // Never more than the burst, however long it rested.
        let much_later = later + Duration::from_secs(3600);
        assert_eq!(
            (0..10).filter(|_| bucket.take(10.0, 3, much_later)).count(),
            3
        );
        assert!(bucket.take(0.0, 3, much_later), "rate 0 means no limit");
    }

    #[test]
    fn addresses_have_their_own_buckets() {
        let limiter = IpLimiter::new(0.001, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(limiter.allow(a) && limiter.allow(a));
        assert!(!limiter.allow(a));
        assert!(limiter.allow(b));
    }
}
