//! HTTP Basic credentials against argon2id or bcrypt hashes. Both are slow on purpose (tens of
//! milliseconds), far too slow for a worker thread that serves thousands of connections, so
//! hashes are checked on one verifier thread; a worker hands it a job over a bounded channel
//! and picks the answer up on its next control tick. Answers are cached per worker (successes a
//! minute, failures a few seconds, bounded), so a client's next requests cost a hash lookup.
//! An unknown user is checked against a dummy hash, so the answer's timing does not tell
//! which users exist.

use std::cell::RefCell;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use ahash::AHashMap;
use base64::Engine as _;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use slab::Slab;
use tracing::warn;

use crate::config::ConsumerId;

/// Verified answers kept per worker.
const CACHE_ENTRIES: usize = 4096;
const CACHE_OK: Duration = Duration::from_secs(60);
const CACHE_FAILED: Duration = Duration::from_secs(5);
/// Verifications waiting per worker; past it a request gets 503.
pub const MAX_PENDING: usize = 64;
/// A hash that verifies nothing, checked for unknown users so that they take as long.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$KWJkU5yuo8QX4cP2lN2Mw7k4wXk8B6yU0bIh0f0Gf3E";

/// Whether `password` matches `hash` (constant time within the hash libraries).
fn verify(hash: &str, password: &[u8]) -> bool {
    use argon2::PasswordVerifier as _;
    if hash.starts_with("$argon2") {
        return argon2::PasswordHash::new(hash).is_ok_and(|h| {
            argon2::Argon2::default()
                .verify_password(password, &h)
                .is_ok()
        });
    }
    bcrypt::verify(password, hash).unwrap_or(false)
}

/// `Basic <base64(user:password)>`, split (RFC 7617); `None` when malformed.
pub fn parse(value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"basic") || rest.len() > 4096 {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim_ascii())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

pub struct Job {
    hash: Arc<str>,
    password: Vec<u8>,
    worker: usize,
    id: u64,
}

pub struct Done {
    id: u64,
    ok: bool,
}

/// The verifier thread's side: one channel in, one answer channel per worker.
pub fn spawn_verifier(workers: usize) -> std::io::Result<(Sender<Job>, Vec<Receiver<Done>>)> {
    let (jobs_tx, jobs) = crossbeam_channel::bounded::<Job>(workers * MAX_PENDING);
    let (answer_tx, answers): (Vec<Sender<Done>>, Vec<Receiver<Done>>) = (0..workers)
        .map(|_| crossbeam_channel::bounded(MAX_PENDING))
        .unzip();
    std::thread::Builder::new()
        .name("ringway-basic".into())
        .spawn(move || {
            for mut job in jobs {
                let ok = verify(&job.hash, &job.password);
                job.password.fill(0);
                if let Some(tx) = answer_tx.get(job.worker) {
                    let _ = tx.send(Done { id: job.id, ok });
                }
            }
        })?;
    Ok((jobs_tx, answers))
}

pub type Jobs = Sender<Job>;
pub type Answers = Receiver<Done>;

/// One worker's verifications in flight and its cache of answers.
#[derive(Default)]
pub struct BasicChecks {
    link: RefCell<Option<(usize, Jobs, Answers)>>,
    pending: RefCell<Slab<Pending>>,
    next_id: std::cell::Cell<u64>,
    cache: RefCell<AHashMap<[u8; 32], Answered>>,
}

/// A cached answer (the consumer, or none for wrong credentials) and until when it holds.
type Answered = (Option<ConsumerId>, Instant);

struct Pending {
    id: u64,
    ok: Option<bool>,
    waker: Option<Waker>,
}

/// The answer for a credential: who it is, or nobody; `Busy` when too many checks wait.
pub enum Verdict {
    Consumer(ConsumerId),
    Invalid,
    Busy,
}

impl BasicChecks {
    /// Connects this worker (number `worker`) to the verifier thread.
    pub fn link(&self, worker: usize, jobs: Jobs, answers: Answers) {
        *self.link.borrow_mut() = Some((worker, jobs, answers));
    }

    /// Applies the verifier's answers and wakes the requests waiting on them (the worker's
    /// control tick).
    pub fn poll_answers(&self) {
        let link = self.link.borrow();
        let Some((_, _, answers)) = link.as_ref() else {
            return;
        };
        let mut pending = self.pending.borrow_mut();
        for done in answers.try_iter() {
            if let Some((_, p)) = pending.iter_mut().find(|(_, p)| p.id == done.id) {
                p.ok = Some(done.ok);
                if let Some(w) = p.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// Checks `password` for `user` (`who`: the consumer and its hash, `None` for an unknown
    /// user), from the cache or the verifier thread.
    pub async fn check(
        &self,
        user: &[u8],
        password: &[u8],
        who: Option<(ConsumerId, &Arc<str>)>,
        now: Instant,
    ) -> Verdict {
        let mut key = Vec::with_capacity(user.len() + password.len() + 1);
        key.extend_from_slice(user);
        key.push(0);
        key.extend_from_slice(password);
        let digest = crate::hash::sha256(&key);
        key.fill(0);
        if let Some(&(answer, until)) = self.cache.borrow().get(&digest) {
            if now < until {
                return answer.map_or(Verdict::Invalid, Verdict::Consumer);
            }
        }
        let hash = who.map_or_else(|| Arc::from(DUMMY_HASH), |(_, h)| Arc::clone(h));
        let Some(ok) = self.verify_off_thread(hash, password).await else {
            return Verdict::Busy;
        };
        let answer = who.filter(|_| ok).map(|(id, _)| id);
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (_, until)| now < *until);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        let ttl = if answer.is_some() {
            CACHE_OK
        } else {
            CACHE_FAILED
        };
        cache.insert(digest, (answer, now + ttl));
        answer.map_or(Verdict::Invalid, Verdict::Consumer)
    }

    async fn verify_off_thread(&self, hash: Arc<str>, password: &[u8]) -> Option<bool> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let slot = {
            let link = self.link.borrow();
            let (worker, jobs, _) = link.as_ref()?;
            let mut pending = self.pending.borrow_mut();
            if pending.len() >= MAX_PENDING {
                return None;
            }
            let job = Job {
                hash,
                password: password.to_vec(),
                worker: *worker,
                id,
            };
            match jobs.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => return None,
                Err(TrySendError::Disconnected(_)) => {
                    warn!("the basic-auth verifier thread is gone");
                    return None;
                }
            }
            pending.insert(Pending {
                id,
                ok: None,
                waker: None,
            })
        };
        // Removes the slot however the wait ends (a client that leaves drops this future).
        let _slot = SlotGuard(&self.pending, slot);
        std::future::poll_fn(|cx| {
            let mut pending = self.pending.borrow_mut();
            let p = &mut pending[slot];
            match p.ok {
                Some(ok) => Poll::Ready(Some(ok)),
                None => {
                    p.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await
    }
}

struct SlotGuard<'a>(&'a RefCell<Slab<Pending>>, usize);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.borrow_mut().try_remove(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_parse_and_hashes_verify() {
        let v = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("acme:s3cr:et")
        );
        let (u, p) = parse(v.as_bytes()).unwrap();
        assert_eq!((&u[..], &p[..]), (&b"acme"[..], &b"s3cr:et"[..]));
        assert!(parse(b"Bearer abc").is_none());
        assert!(parse(b"Basic !!!").is_none());
        let b = bcrypt::hash("pw", 4).unwrap();
        assert!(crate::config::check_password_hash(&b).is_ok());
        assert!(verify(&b, b"pw") && !verify(&b, b"pW"));
        assert!(crate::config::check_password_hash(DUMMY_HASH).is_ok());
        assert!(!verify(DUMMY_HASH, b""));
        assert!(crate::config::check_password_hash("$1$md5$x").is_err());
    }
}
