use std::sync::Arc;

use serde_json::Value;

use super::*;

/// A sink the test reads back.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("sink").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    /// The lines `log` wrote since the last call, each parsed.
    fn take(&self, log: &AuditLog) -> Vec<Value> {
        log.flush();
        let bytes = std::mem::take(&mut *self.0.lock().expect("sink"));
        let text = String::from_utf8(bytes).expect("UTF-8");
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "whole lines: {text}"
        );
        text.lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    }
}

fn settings(cached: CachedAudit, fail_closed: bool) -> AuditSettings {
    AuditSettings {
        cached,
        fail_closed,
    }
}

fn audit(cached: CachedAudit) -> (AuditLog, Lines) {
    let lines = Lines::default();
    let log = AuditLog::with_sink(
        Box::new(lines.clone()),
        settings(cached, false),
        QUEUE_LINES,
        &Metrics::new(),
    )
    .expect("a writer thread");
    (log, lines)
}

fn refused(n: usize) -> Refused<'static> {
    Refused {
        audit: "connection",
        time: format!("refusal {n}"),
        caller: "",
        peer: "127.0.0.1:40000",
        outcome: "refused",
        code: "",
        reason: "TLS handshake failed".into(),
        suppressed: 0,
    }
}

#[test]
fn a_decision_is_one_json_line_with_only_whether_there_was_a_pid() {
    let (log, lines) = audit(CachedAudit::Each);
    let scopes = ["nav:a".to_owned(), "nav:b".to_owned()];
    let base = decision("r-1");
    let decision = Decision {
        audit: "token",
        ask: Ask {
            scopes: &scopes,
            pid: true,
            ..base.ask
        },
        jti: "j-1",
        outcome: "issued",
        code: "OK",
        ..base
    };
    let _ = log.record(&decision);
    let written = lines.take(&log);
    assert_eq!(written.len(), 1);
    let line = &written[0];
    assert_eq!(line["audit"], "token");
    assert_eq!(line["caller"], "uid:1000");
    assert_eq!(line["scopes"], serde_json::json!(["nav:a", "nav:b"]));
    assert_eq!(line["outcome"], "issued");
    assert_eq!(line["expires_at"], 1_800_000_000);
    assert_eq!(
        line["pid"],
        Value::Bool(true),
        "whether, never which person"
    );
    // Empty optional fields are left out.
    for absent in ["iss_onbehalfof", "attempt"] {
        assert!(line.get(absent).is_none(), "{absent}: {line}");
    }
    let _ = log.record(&Decision {
        ask: Ask {
            pid: false,
            iss_onbehalfof: "kunde-1",
            ..decision.ask
        },
        attempt: Some(2),
        ..decision
    });
    let line = &lines.take(&log)[0];
    assert!(line.get("pid").is_none(), "{line}");
    assert_eq!(line["attempt"], 2);
    assert_eq!(line["iss_onbehalfof"], "kunde-1");
}

/// A sink that counts its writes.
#[derive(Clone, Default)]
struct Counted(Lines, Arc<std::sync::atomic::AtomicUsize>);

impl Write for Counted {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Lines queued one by one, as requests answer, share writes: the writer lingers after
/// a write instead of waking for each line, so it writes at most about once per
/// [`LINGER`]. (Without the linger, each line 100 µs apart is a write of its own.)
#[test]
fn lines_that_come_one_by_one_share_a_write() {
    let sink = Counted::default();
    let log = AuditLog::with_sink(
        Box::new(sink.clone()),
        settings(CachedAudit::Each, false),
        QUEUE_LINES,
        &Metrics::new(),
    )
    .expect("a writer thread");
    let per_second = usize::try_from(REFUSALS_PER_SECOND).expect("small");
    let started = std::time::Instant::now();
    for n in 0..per_second {
        log.refused(refused(n));
        // Time for the writer to take each line alone, were it not to linger.
        let gap = std::time::Instant::now();
        while gap.elapsed() < Duration::from_micros(100) {
            std::hint::spin_loop();
        }
    }
    let took = started.elapsed();
    assert_eq!(sink.0.take(&log).len(), per_second);
    let writes = sink.1.load(std::sync::atomic::Ordering::SeqCst);
    let most = 2 + usize::try_from(took.as_micros() / LINGER.as_micros()).expect("small");
    assert!(
        writes <= most,
        "{writes} writes for {per_second} lines in {took:?}; at most {most} with the linger"
    );
}

#[tokio::test(start_paused = true)]
async fn refusals_are_cut_at_the_rate_and_the_next_line_says_how_many_were_left_out() {
    let (log, lines) = audit(CachedAudit::Each);
    let per_second = usize::try_from(REFUSALS_PER_SECOND).expect("small");
    for n in 0..per_second + 5 {
        log.refused(refused(n));
    }
    let written = lines.take(&log);
    assert_eq!(written.len(), per_second);
    assert!(written.iter().all(|line| line.get("suppressed").is_none()));
    assert_eq!(
        written[per_second - 1]["time"],
        format!("refusal {}", per_second - 1)
    );

    // The window is one second from its start: just before, still cut.
    tokio::time::advance(Duration::from_millis(999)).await;
    log.refused(refused(100));
    assert!(lines.take(&log).is_empty());
    tokio::time::advance(Duration::from_millis(1)).await;
    log.refused(refused(101));
    log.refused(refused(102));
    let written = lines.take(&log);
    assert_eq!(written.len(), 2);
    assert_eq!(written[0]["time"], "refusal 101");
    assert_eq!(written[0]["suppressed"], 6);
    assert!(written[1].get("suppressed").is_none(), "counted once");
}

fn answer<'a>(caller: &'a str, scopes: &'a [String], jti: &'a str) -> CachedAnswer<'a> {
    CachedAnswer {
        caller,
        key: "default",
        client_id: "c",
        scopes,
        environment: "test",
        jti,
    }
}

#[test]
fn cached_answers_are_summed_per_caller_and_shape_then_counted_afresh() {
    let (log, lines) = audit(CachedAudit::Summary(Duration::from_secs(60)));
    assert_eq!(log.summary_interval(), Some(Duration::from_secs(60)));
    assert_eq!(audit(CachedAudit::Each).0.summary_interval(), None);
    let (one, two) = (["a:b".to_owned()], ["a:b".to_owned(), "c:d".to_owned()]);
    for jti in ["j1", "j1", "j2"] {
        log.count_cached(&answer("uid:1000", &one, jti));
    }
    log.count_cached(&answer("uid:1000", &two, "j3"));
    log.count_cached(&answer("uid:1001", &one, "j1"));
    log.count_cached(&answer("uid:1001", &one, "j1"));
    assert!(lines.take(&log).is_empty(), "counted, not written");

    log.write_cached_summaries();
    let mut written = lines.take(&log);
    written.sort_by_key(|line| (line["caller"].to_string(), line["count"].to_string()));
    let summary = |line: &Value| {
        (
            line["caller"].as_str().map(str::to_owned),
            line["scopes"].clone(),
            line["count"].as_u64(),
            line["jti"].as_str().map(str::to_owned),
        )
    };
    let expected = [
        ("uid:1000", serde_json::json!(["a:b", "c:d"]), 1, "j3"),
        ("uid:1000", serde_json::json!(["a:b"]), 3, "j2"),
        ("uid:1001", serde_json::json!(["a:b"]), 2, "j1"),
    ];
    assert_eq!(written.len(), expected.len(), "{written:?}");
    for (line, (caller, scopes, count, jti)) in written.iter().zip(expected) {
        assert_eq!(
            summary(line),
            (Some(caller.into()), scopes, Some(count), Some(jti.into()))
        );
        assert_eq!(line["audit"], "token_cached");
        assert!(line["since"].is_string() && line["time"].is_string());
    }

    // Counting starts afresh, from when the last summary was written.
    log.write_cached_summaries();
    assert!(lines.take(&log).is_empty());
    log.count_cached(&answer("uid:1000", &one, "j4"));
    log.write_cached_summaries();
    let written = lines.take(&log);
    assert_eq!(written.len(), 1);
    assert_eq!(written[0]["count"], 1);
}

/// A grant decision whose `request_id` is `id`.
fn decision(id: &str) -> Decision<'_> {
    Decision {
        audit: "grant",
        request_id: id,
        time: "2026-12-02T10:00:00Z".into(),
        caller: "uid:1000",
        peer: "unix",
        ask: Ask {
            key: "default",
            client_id: "c",
            scopes: &[],
            environment: "test",
            resources: &[],
            consumer_org: "",
            authorization_types: &[],
            pid: false,
            iss_onbehalfof: "",
        },
        certificate_sha256: "ab12",
        jti: "j",
        expires_at: Some(1_800_000_000),
        attempt: None,
        outcome: "signed",
        code: "Ok",
        reason: "",
    }
}

fn request_ids(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|line| line["request_id"].as_str().expect("an id").to_owned())
        .collect()
}

/// A sink whose every write fails, as on a full disk.
struct Failing;

impl Write for Failing {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sink that says when a write starts and then waits for a permit, so a test can
/// hold the writer thread inside a write; it counts the writes.
struct Gated {
    lines: Lines,
    entered: std::sync::mpsc::Sender<()>,
    permits: Receiver<()>,
    writes: Arc<std::sync::atomic::AtomicUsize>,
}

impl Write for Gated {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = self.entered.send(());
        self.permits
            .recv()
            .map_err(|_| std::io::Error::other("the test is gone"))?;
        let _ = self
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.lines.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The parts of a gated log: the log, its lines, the writer's "write started"
/// signals, the permits to send and the count of writes.
struct GatedLog {
    log: AuditLog,
    lines: Lines,
    entered: Receiver<()>,
    permits: std::sync::mpsc::Sender<()>,
    writes: Arc<std::sync::atomic::AtomicUsize>,
}

fn gated(fail_closed: bool, queue: usize) -> GatedLog {
    let lines = Lines::default();
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (permits, permits_rx) = std::sync::mpsc::channel();
    let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sink = Gated {
        lines: lines.clone(),
        entered: entered_tx,
        permits: permits_rx,
        writes: Arc::clone(&writes),
    };
    let log = AuditLog::with_sink(
        Box::new(sink),
        settings(CachedAudit::Each, fail_closed),
        queue,
        &Metrics::new(),
    )
    .expect("a writer thread");
    GatedLog {
        log,
        lines,
        entered,
        permits,
        writes,
    }
}

/// Records `count` decisions, numbered from 0, the rest while the writer is held in its
/// write of the first; gives back their ids.
fn record_behind_the_first(log: &AuditLog, entered: &Receiver<()>, count: usize) -> Vec<String> {
    let ids: Vec<String> = (0..count).map(|n| n.to_string()).collect();
    let _ = log.record(&decision(&ids[0]));
    entered.recv().expect("the writer is in its first write");
    for id in &ids[1..] {
        let _ = log.record(&decision(id));
    }
    ids
}

#[test]
fn lines_keep_their_order_and_what_waits_is_written_in_one_batch() {
    let GatedLog {
        log,
        lines,
        entered,
        permits,
        writes,
    } = gated(false, QUEUE_LINES);
    let ids = record_behind_the_first(&log, &entered, 300);
    // One write for the first line, then the 299 that waited: a batch of
    // BATCH_LINES, and the rest.
    for _ in 0..3 {
        permits.send(()).expect("the writer waits");
    }
    let written = lines.take(&log);
    assert_eq!(request_ids(&written), ids, "in the order recorded");
    assert_eq!(writes.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(log.losses.queue_full.get(), 0);
}

#[tokio::test]
async fn a_full_queue_loses_the_line_at_once_and_counts_it_or_with_fail_closed_refuses() {
    for fail_closed in [false, true] {
        let GatedLog {
            log,
            lines,
            entered,
            permits,
            ..
        } = gated(fail_closed, 2);
        let first = log.record(&decision("0"));
        entered.recv().expect("the writer is in its first write");
        let queued = [log.record(&decision("1")), log.record(&decision("2"))];
        // The queue holds two: the next line is lost without waiting for the disk.
        let lost = log.record(&decision("3"));
        assert_eq!(log.losses.queue_full.get(), 1, "fail_closed {fail_closed}");
        if fail_closed {
            assert!(matches!(lost, Receipt::Lost), "{lost:?}");
            assert!(lost.written().await.is_err());
        } else {
            assert!(matches!(lost, Receipt::Unconfirmed), "{lost:?}");
        }
        for _ in 0..2 {
            permits.send(()).expect("the writer waits");
        }
        for receipt in [first].into_iter().chain(queued) {
            receipt.written().await.expect("written");
        }
        assert_eq!(request_ids(&lines.take(&log)), ["0", "1", "2"]);
    }
}

#[tokio::test]
async fn a_failed_write_refuses_the_answer_with_fail_closed_and_is_counted_without() {
    let failing = |fail_closed| {
        AuditLog::with_sink(
            Box::new(Failing),
            settings(CachedAudit::Each, fail_closed),
            QUEUE_LINES,
            &Metrics::new(),
        )
        .expect("a writer thread")
    };
    let closed = failing(true);
    let receipt = closed.record(&decision("1"));
    assert!(matches!(receipt, Receipt::Queued(_)), "{receipt:?}");
    let error = receipt.written().await.expect_err("not written");
    assert_eq!(error.to_string(), "the audit trail cannot be written");
    assert_eq!(closed.losses.write_failed.get(), 1);

    let open = failing(false);
    let receipt = open.record(&decision("1"));
    assert!(matches!(receipt, Receipt::Unconfirmed), "{receipt:?}");
    receipt.written().await.expect("nothing to wait for");
    open.flush();
    assert_eq!(open.losses.write_failed.get(), 1);
    assert_eq!(open.losses.queue_full.get(), 0);

    // A sink that works confirms the line once it is written.
    let lines = Lines::default();
    let log = AuditLog::with_sink(
        Box::new(lines.clone()),
        settings(CachedAudit::Each, true),
        QUEUE_LINES,
        &Metrics::new(),
    )
    .expect("a writer thread");
    log.record(&decision("7")).written().await.expect("written");
    assert_eq!(request_ids(&lines.take(&log)), ["7"]);
}

#[test]
fn closing_writes_what_is_queued_and_later_lines_are_counted_lost() {
    let GatedLog {
        log,
        lines,
        entered,
        permits,
        ..
    } = gated(false, QUEUE_LINES);
    let ids = record_behind_the_first(&log, &entered, 20);
    for _ in 0..2 {
        permits.send(()).expect("the writer waits");
    }
    log.close();
    let text =
        String::from_utf8(std::mem::take(&mut *lines.0.lock().expect("sink"))).expect("UTF-8");
    let written: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(request_ids(&written), ids, "all of the queue, in order");
    let _ = log.record(&decision("late"));
    assert_eq!(log.losses.queue_full.get(), 1, "the writer is gone");
    log.close();
}
