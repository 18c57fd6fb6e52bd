//! The pool with real sessions of a real module (SoftHSM), never a mock of PKCS#11.
//! PKCS#11 state is per process and SoftHSM reads `SOFTHSM2_CONF` when initialised, so
//! each test runs again as a child of this test binary, with a token of its own.

use std::{
    process::Command,
    sync::{atomic::AtomicBool, mpsc},
};

use cryptoki::{
    context::{CInitializeArgs, CInitializeFlags},
    object::{Attribute, ObjectClass},
    session::UserType,
    types::AuthPin,
};

use super::*;
use crate::config::KeyLocator;

/// Set in the child that runs a test's body.
const IN_CHILD: &str = "GRANT_AGENT_POOL_TEST_TOKEN";
const PIN: &str = "1234";

/// In the child: the module, initialised, the slot of the test's token and an object
/// in it to stand for a key. In the parent: makes the token, runs the test in a child
/// and returns `None` once it passed.
fn own_token(test: &str) -> Option<(Pkcs11, Slot, KeyRef)> {
    let module = crate::dev::softhsm_module()
        .expect("SoftHSM2 is required: sudo apt-get install -y softhsm2");
    if std::env::var_os(IN_CHILD).is_some() {
        return Some(open_token(&module));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).expect("token dir");
    let conf = dir.path().join("softhsm2.conf");
    let text = format!(
        "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
        tokens.display()
    );
    std::fs::write(&conf, text).expect("softhsm2.conf");
    let init = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "pool"])
        .args(["--so-pin", "123456", "--pin", PIN])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .expect("softhsm2-util");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let path = module_path!();
    let name = format!("{}::{test}", path.split_once("::").map_or(path, |(_, p)| p));
    let run = Command::new(std::env::current_exe().expect("the test binary"))
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(IN_CHILD, "1")
        .output()
        .expect("the child test");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    None
}

fn open_token(module: &std::path::Path) -> (Pkcs11, Slot, KeyRef) {
    let pkcs11 = Pkcs11::new(module).expect("module");
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize");
    let slots = pkcs11.get_slots_with_token().expect("slots");
    let slot = *slots.first().expect("the test's token");
    let session = pkcs11.open_rw_session(slot).expect("session");
    session
        .login(UserType::User, Some(&AuthPin::new(PIN.into())))
        .expect("login");
    let handle = session
        .create_object(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Label(b"pool".to_vec()),
        ])
        .expect("an object");
    let key = KeyRef {
        handle,
        locator: Arc::new(KeyLocator::Label("pool".into())),
    };
    (pkcs11, slot, key)
}

/// A request that holds the pool's one session until `release` is sent.
struct Holder {
    release: mpsc::Sender<()>,
    answer: tokio::task::JoinHandle<Result<(Vec<u8>, Duration), RequestError>>,
}

/// Starts a [`Holder`] and returns once its sign runs on the session's thread.
fn hold(pool: &Arc<SessionPool>, key: &KeyRef) -> Holder {
    let (started, on_start) = mpsc::channel();
    let (release, gate) = mpsc::channel::<()>();
    let (pool, key) = (Arc::clone(pool), key.clone());
    let answer = tokio::spawn(async move {
        pool.sign(key, None, move |_, _| {
            let _ = started.send(());
            let _ = gate.recv();
            Ok(b"held".to_vec())
        })
        .await
    });
    on_start
        .recv_timeout(STUCK)
        .expect("the session took the request");
    Holder { release, answer }
}

/// How long a test waits for what a working pool does at once, so that a broken one
/// fails the test instead of hanging it. Never waited out when the pool works.
const STUCK: Duration = Duration::from_secs(30);

/// `work`'s output, unless the pool is stuck.
async fn bounded<T>(work: impl Future<Output = T>) -> T {
    tokio::time::timeout(STUCK, work)
        .await
        .expect("the pool is stuck")
}

/// Yields until `waiting` requests are queued.
async fn until_waiting(pool: &SessionPool, waiting: usize) {
    bounded(async {
        while pool.load().waiting != waiting {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// [`until_waiting`] for a thread.
fn spin_until_waiting(pool: &SessionPool, waiting: usize) {
    let stuck = Instant::now() + STUCK;
    while pool.load().waiting != waiting {
        assert!(Instant::now() < stuck, "the pool is stuck");
        std::thread::yield_now();
    }
}

/// A sign that records whether it ran.
fn signs(
    ran: &Arc<AtomicBool>,
) -> impl Fn(&Session, ObjectHandle) -> Result<Vec<u8>, FailedCall> + Send + use<> {
    let ran = Arc::clone(ran);
    move |_, _| {
        ran.store(true, Ordering::SeqCst);
        Ok(b"signed".to_vec())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_with_busy() {
    let Some((pkcs11, slot, key)) = own_token("a_full_queue_refuses_at_once_with_busy") else {
        return;
    };
    let pool =
        Arc::new(SessionPool::new(pkcs11, slot, 1, 1, ErrorCounts::default()).expect("pool"));
    let holder = hold(&pool, &key);
    let queued = Arc::new(AtomicBool::new(false));
    let waiting = {
        let (pool, key, sign) = (Arc::clone(&pool), key.clone(), signs(&queued));
        tokio::spawn(async move { pool.sign(key, None, sign).await })
    };
    until_waiting(&pool, 1).await;
    let refused = Arc::new(AtomicBool::new(false));
    let busy = bounded(pool.sign(key, None, signs(&refused))).await;
    assert!(
        matches!(busy, Err(RequestError::Busy { queued: 1 })),
        "{busy:?}"
    );

    holder.release.send(()).expect("release");
    let held = bounded(holder.answer).await.expect("task").expect("signed");
    assert_eq!(held.0, b"held");
    let (signature, _) = bounded(waiting)
        .await
        .expect("task")
        .expect("the queued one is served");
    assert_eq!(signature, b"signed");
    assert!(queued.load(Ordering::SeqCst));
    assert!(
        !refused.load(Ordering::SeqCst),
        "a refused request is never signed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_the_queue_cannot_meet_is_refused_at_once() {
    let Some((pkcs11, slot, key)) =
        own_token("a_deadline_the_queue_cannot_meet_is_refused_at_once")
    else {
        return;
    };
    let pool =
        Arc::new(SessionPool::new(pkcs11, slot, 1, 4, ErrorCounts::default()).expect("pool"));
    // One sign, so the pool knows how long a sign takes.
    let first = Arc::new(AtomicBool::new(false));
    let _ = bounded(pool.sign(key.clone(), None, signs(&first)))
        .await
        .expect("signed");
    // The session thread records the time just after it answers.
    bounded(async {
        while pool.shared.average_nanos.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    let holder = hold(&pool, &key);
    let refused = Arc::new(AtomicBool::new(false));
    let late = bounded(pool.sign(key.clone(), Some(Instant::now()), signs(&refused))).await;
    assert!(matches!(late, Err(RequestError::Deadline)), "{late:?}");
    assert_eq!(pool.load().waiting, 0, "refused, not queued");

    // A deadline the queue can meet waits its turn.
    let admitted = Arc::new(AtomicBool::new(false));
    let waiting = {
        let (pool, key, sign) = (Arc::clone(&pool), key.clone(), signs(&admitted));
        let deadline = Instant::now() + Duration::from_secs(3600);
        tokio::spawn(async move { pool.sign(key, Some(deadline), sign).await })
    };
    until_waiting(&pool, 1).await;
    holder.release.send(()).expect("release");
    let _ = bounded(holder.answer).await.expect("task").expect("signed");
    let _ = bounded(waiting)
        .await
        .expect("task")
        .expect("signed in time");
    assert!(admitted.load(Ordering::SeqCst));
    assert!(!refused.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_caller_left_is_never_signed() {
    let Some((pkcs11, slot, key)) = own_token("a_request_whose_caller_left_is_never_signed") else {
        return;
    };
    let pool =
        Arc::new(SessionPool::new(pkcs11, slot, 1, 4, ErrorCounts::default()).expect("pool"));
    let holder = hold(&pool, &key);
    let abandoned = Arc::new(AtomicBool::new(false));
    {
        let mut request = Box::pin(pool.sign(key.clone(), None, signs(&abandoned)));
        // Polled once: queued behind the holder. Then its caller goes away.
        tokio::select! {
            biased;
            answer = &mut request => panic!("answered while the session is held: {answer:?}"),
            () = std::future::ready(()) => {}
        }
        assert_eq!(pool.load().waiting, 1);
    }
    holder.release.send(()).expect("release");
    let _ = bounded(holder.answer).await.expect("task").expect("signed");
    // One session, first in first out: the abandoned request was taken before this one.
    let next = Arc::new(AtomicBool::new(false));
    let _ = bounded(pool.sign(key, None, signs(&next)))
        .await
        .expect("signed");
    assert!(next.load(Ordering::SeqCst));
    assert!(!abandoned.load(Ordering::SeqCst), "nobody would read it");
}

#[test]
fn run_blocking_waits_its_turn_even_when_the_queue_is_full() {
    let Some((pkcs11, slot, key)) =
        own_token("run_blocking_waits_its_turn_even_when_the_queue_is_full")
    else {
        return;
    };
    let pool = SessionPool::new(pkcs11, slot, 1, 1, ErrorCounts::default()).expect("pool");
    let order = Arc::new(Mutex::new(Vec::new()));
    let (started, on_start) = mpsc::channel();
    let (release, gate) = mpsc::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    std::thread::scope(|scope| {
        let run = |name: &'static str| {
            let order = Arc::clone(&order);
            move |session: &Session| {
                order.lock().expect("order").push(name);
                session
                    .get_session_info()
                    .map(|info| info.slot_id())
                    .map_err(|e| HsmError::from(FailedCall::of("C_GetSessionInfo")(e)))
            }
        };
        let pool = &pool;
        let first_run = run("first");
        let first = scope.spawn(move || {
            pool.run_blocking(move |session| {
                let _ = started.send(());
                let _ = gate.recv();
                first_run(session)
            })
        });
        on_start
            .recv_timeout(STUCK)
            .expect("the session took the first");
        let second_run = run("second");
        let second = scope.spawn(move || pool.run_blocking(second_run));
        spin_until_waiting(pool, 1);
        let third_run = run("third");
        let third = scope.spawn(move || pool.run_blocking(third_run));
        spin_until_waiting(pool, 2);
        // The queue is over its length: a sign is refused, the runs wait.
        let busy = runtime.block_on(pool.sign(key, None, |_, _| Ok(Vec::new())));
        assert!(
            matches!(busy, Err(RequestError::Busy { queued: 2 })),
            "{busy:?}"
        );
        release.send(()).expect("release");
        for run in [first, second, third] {
            assert_eq!(run.join().expect("thread").expect("ran"), slot);
        }
    });
    assert_eq!(*order.lock().expect("order"), ["first", "second", "third"]);
}

#[test]
fn dropping_the_pool_fails_the_queued_requests() {
    let Some((pkcs11, slot, _)) = own_token("dropping_the_pool_fails_the_queued_requests") else {
        return;
    };
    let pool = SessionPool::new(pkcs11, slot, 1, 4, ErrorCounts::default()).expect("pool");
    let (started, on_start) = mpsc::channel();
    let (release, gate) = mpsc::channel::<()>();
    // Jobs as run_blocking queues them, with their reply channels held here: every
    // caller of the pool's own methods holds the pool, which then cannot be dropped.
    pool.shared
        .submit(
            Box::new(move |_| {
                let _ = started.send(());
                let _ = gate.recv();
            }),
            None,
        )
        .expect("queued");
    on_start
        .recv_timeout(STUCK)
        .expect("the session took the first");
    let ran = Arc::new(AtomicBool::new(false));
    let (reply, answer) = mpsc::sync_channel::<()>(1);
    let queued = Arc::clone(&ran);
    pool.shared
        .submit(
            Box::new(move |_| {
                queued.store(true, Ordering::SeqCst);
                let _ = reply.send(());
            }),
            None,
        )
        .expect("queued");
    let shared = Arc::clone(&pool.shared);
    let dropping = std::thread::spawn(move || drop(pool));
    // The pool is still waiting for the first job, so only the drop can end this.
    assert_eq!(
        answer.recv_timeout(STUCK),
        Err(mpsc::RecvTimeoutError::Disconnected),
        "the queued job's reply channel is dropped"
    );
    assert!(matches!(
        shared.submit(Box::new(|_| {}), None),
        Err(RequestError::Unavailable)
    ));
    release.send(()).expect("release");
    dropping.join().expect("dropped");
    assert!(!ran.load(Ordering::SeqCst));
}
