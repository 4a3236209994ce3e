//! Security end to end, as DESIGN.md ("Security", "Worker") promises it: bearer tokens with roles
//! on the scheduler and the worker, TLS with a CA made here by the real `openssl`, the refusal to
//! serve a non-loopback address in the clear, toolchain uploads verified before anything is stored,
//! and the worker's sandbox and request validation driven over gRPC exactly as a client (or an
//! attacker posing as one) would drive them.
//!
//! Everything is real: `ferry-scheduler` and `ferry-worker` processes on loopback, real `bwrap`,
//! proc-macros compiled here with the installed rustc whose code is the attack. Where an attack is
//! harmless on the host (connecting to the test's own listener, reading files), it is also run
//! there with plain rustc as a control, so a macro that cannot do what it claims fails the test
//! instead of passing it vacuously; after each attack the same worker must still compile a benign
//! crate. Helpers are at the bottom of the file.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use ferry_proto::v1::scheduler_client::SchedulerClient;
use ferry_proto::v1::worker_client::WorkerClient;
use ferry_proto::v1::{self, job_event, toolchain_upload};
use ferry_proto::{bearer, to_digest};
use ferry_tests::{Daemon, Pki, World, bin, installed_sysroot, ok};
use serde_json::Value;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

const CLIENT_TOKEN: &str = "client-token-5f0c2a9e41d7";
const WORKER_TOKEN: &str = "worker-token-b83e6d10c4a2";

/// The sandbox limits of the worker the attacks run on.
const SANDBOX_LIMITS: &str = "[sandbox]\ncpu_secs = 2\nwall_clock_secs = 8\nmax_processes = 128\n\
                              memory_bytes = 2147483648\nfile_size_bytes = 10485760\ndisk_bytes = 67108864\n";

// ---- tokens ------------------------------------------------------------------------------------

#[test]
fn tokens_decide_who_may_do_what() {
    let mut world = World::new();
    let config = write(&world, "scheduler.toml", &tokens_toml(&[(CLIENT_TOKEN, "client"), (WORKER_TOKEN, "worker")]));
    let scheduler = world.scheduler(&["--config", utf8(&config)]);
    world.set("FERRY_SCHEDULER", scheduler.url());

    assert_refused(&ferry(&world, &["status", "--json"]), &["needs a bearer token", "FERRY_TOKEN"]);
    world.set("FERRY_TOKEN", "an-unknown-token-0123456789");
    assert_refused(&ferry(&world, &["status", "--json"]), &["token is not known"]);
    world.set("FERRY_TOKEN", WORKER_TOKEN);
    assert_refused(&ferry(&world, &["status", "--json"]), &["'client' role"]);
    assert_refused(&ferry(&world, &["toolchain", "list", "--json"]), &["'client' role"]);
    world.set("FERRY_TOKEN", CLIENT_TOKEN);
    assert_eq!(workers(&status(&world)), Vec::<String>::new());
    // Uploading a toolchain (which makes every worker fetch it) needs its own role.
    world.set("FERRY_CACHE_DIR", shared_store());
    assert_refused(&ferry(&world, &["toolchain", "upload", "--json"]), &["'toolchain-upload' role"]);

    // A worker holding a client token cannot register; it says why and exits (a worker looping
    // quietly would look healthy to its supervisor).
    let impostor_config = write(&world, "impostor.toml", &format!("token = \"{CLIENT_TOKEN}\"\n"));
    let mut impostor =
        without_token(&mut world, |w| w.worker("impostor", &scheduler.url(), &["--config", utf8(&impostor_config)]));
    let start = Instant::now();
    let exited = loop {
        if let Some(status) = impostor.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the impostor still runs:\n{}", impostor.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exited.code(), Some(78), "{}", impostor.log_text());
    let said = impostor.log_text();
    assert!(said.contains("WorkerSession needs a token with the 'worker' role"), "{said}");
    assert!(said.contains("check worker.token"), "{said}");
    assert_eq!(workers(&status(&world)), Vec::<String>::new(), "a worker registered with a client token");

    // A worker with the worker token registers.
    let worker_config = write(&world, "worker.toml", &format!("token = \"{WORKER_TOKEN}\"\n"));
    let worker = without_token(&mut world, |w| w.worker("w1", &scheduler.url(), &["--config", utf8(&worker_config)]));
    let registered = world.wait_for_status(Duration::from_secs(30), |s| !workers(s).is_empty());
    assert_eq!(
        workers(&registered),
        std::slice::from_ref(&worker.addr),
        "only the worker with the worker token registers"
    );
    assert!(!impostor.log_text().contains("registered with the scheduler"), "{}", impostor.log_text());

    // The worker's own service takes job grants from the scheduler, never tokens: a client's
    // token is worthless there (and never sent), a grant is needed.
    let rt = runtime();
    let url = format!("http://{}", worker.addr);
    let call = |token: Option<&str>, grant: Option<&[u8]>| {
        rt.block_on(bounded(find_missing_as(&url, None, token, grant, vec![[1; 32]])))
    };
    let refused = call(None, None).expect_err("FindMissing without a grant");
    assert_status(&refused, Code::Unauthenticated, &["no job grant"]);
    let refused = call(Some(CLIENT_TOKEN), None).expect_err("FindMissing with the client token, no grant");
    assert_status(&refused, Code::Unauthenticated, &["no job grant"]);
    let forged = ferry_proto::Grant::new(1, &workers(&registered)[0]).sign(&[7; 32]);
    let refused = call(None, Some(&forged)).expect_err("FindMissing with a grant signed by someone else");
    assert_status(&refused, Code::Unauthenticated, &["not made for this worker"]);
    let scheduler_channel = rt.block_on(connect_trusting(&scheduler.url(), None)).expect("scheduler");
    let mut scheduler_api = SchedulerClient::new(scheduler_channel);
    let grant = rt.block_on(async {
        let mut request = tonic::Request::new(v1::AllocateRequest {
            toolchain: Some(to_digest([9; 32])),
            client_id: "t".into(),
            protocol: 0,
        });
        request.metadata_mut().insert("authorization", bearer(CLIENT_TOKEN).parse().expect("header"));
        match scheduler_api.allocate(request).await.expect("Allocate").into_inner().result {
            Some(v1::allocate_response::Result::Assigned(a)) => a.grant,
            other => panic!("no assignment: {other:?}"),
        }
    });
    assert_eq!(call(None, Some(&grant)).expect("FindMissing with a grant"), [[1; 32]]);
    // A worker config still listing tokens for clients is refused, saying why.
    let stale = write(&world, "stale.toml", &tokens_toml(&[(CLIENT_TOKEN, "client")]));
    let out = run_bounded(
        {
            let mut cmd = world.command(bin("ferry-worker"));
            cmd.args(["--scheduler", &scheduler.url(), "--config", utf8(&stale), "--data-dir"])
                .arg(world.path().join("stale"));
            cmd
        },
        Duration::from_secs(30),
    );
    assert!(!out.status.success() && text(&out.stderr).contains("job grants"), "{}", text(&out.stderr));
}

/// A worker id belongs to the token that first registered it: another worker token cannot take
/// it over (its session is refused while the owner's lives, and after). One token's sessions
/// together offer at most `max_slots_per_credential` slots: a session asking for 4096 gets what
/// is left of the share, and one beyond the share is refused, so a single worker token cannot
/// draw every job. The owner itself restarts (a second session under its id) freely.
#[test]
fn a_worker_token_can_neither_take_over_an_id_nor_draw_every_job() {
    const OTHER_WORKER: &str = "worker-token-second-77d1e0a3";
    let world = World::new();
    let mut toml = tokens_toml(&[(CLIENT_TOKEN, "client"), (WORKER_TOKEN, "worker"), (OTHER_WORKER, "worker")]);
    toml.insert_str(0, "max_slots_per_credential = 8\n");
    let config = write(&world, "scheduler.toml", &toml);
    let scheduler = world.scheduler(&["--config", utf8(&config)]);
    let rt = runtime();
    // A raw session: Ok(the slots the scheduler lists for it), or the refusal.
    let open = |token: &str,
                id: &str,
                slots: u32,
                protocol: u32|
     -> Result<tokio::sync::mpsc::Sender<v1::WorkerMessage>, Status> {
        rt.block_on(bounded(async {
            let mut client = SchedulerClient::new(connect_trusting(&scheduler.url(), None).await.expect("scheduler"));
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let register = v1::Register {
                worker_id: id.into(),
                address: "127.0.0.1:9".into(),
                slots,
                toolchains: vec![],
                version: "0".into(),
                protocol,
            };
            tx.send(v1::WorkerMessage { kind: Some(v1::worker_message::Kind::Register(register)) })
                .await
                .expect("send");
            let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            request.metadata_mut().insert("authorization", bearer(token).parse().expect("header"));
            let mut inbound = client.worker_session(request).await?.into_inner();
            match inbound.message().await? {
                Some(v1::SchedulerMessage { kind: Some(v1::scheduler_message::Kind::Registered(_)) }) => Ok(tx),
                other => panic!("no registration: {other:?}"),
            }
        }))
    };
    let slots_of = |id: &str| -> u64 {
        let mut world = World::new();
        world.set("FERRY_SCHEDULER", scheduler.url()).set("FERRY_TOKEN", CLIENT_TOKEN);
        let s = status(&world);
        let w = s["workers"].as_array().expect("workers").iter().find(|w| w["id"] == id).cloned();
        w.and_then(|w| w["slots"].as_u64()).unwrap_or(0)
    };
    let _owner = open(WORKER_TOKEN, "builder-1", 2, 0).expect("the owner registers");
    assert_eq!(slots_of("builder-1"), 2);
    let refused = open(OTHER_WORKER, "builder-1", 2, 0).expect_err("another token took the id over");
    assert_status(&refused, Code::PermissionDenied, &["worker id 'builder-1' belongs to another worker's token"]);
    assert_eq!(slots_of("builder-1"), 2, "the owner's session is still the one listed");
    // The share: 8 in all for one token.
    let _greedy = open(WORKER_TOKEN, "builder-2", 4096, 0).expect("a second session of the token");
    assert_eq!(slots_of("builder-2"), 6, "4096 slots asked, what is left of the token's 8 given");
    let refused = open(WORKER_TOKEN, "builder-3", 1, 0).expect_err("a session beyond the token's share");
    assert_status(&refused, Code::ResourceExhausted, &["already offer 8 slots", "max_slots_per_credential = 8"]);
    // Another token has its own share; the owner restarts under its id.
    let _other = open(OTHER_WORKER, "builder-4", 4096, 0).expect("another token's session");
    assert_eq!(slots_of("builder-4"), 8);
    let _restarted = open(WORKER_TOKEN, "builder-1", 2, ferry_proto::PROTOCOL).expect("the owner restarts");
    assert_eq!(slots_of("builder-1"), 2);

    // One protocol revision apart: a worker (or a client) newer than the scheduler is told which
    // side to upgrade; an older one (0: from before the field) is served, as above.
    let next = ferry_proto::PROTOCOL + 1;
    let refused = open(WORKER_TOKEN, "builder-5", 1, next).expect_err("a newer worker");
    let said = format!("speaks protocol revision {}; the worker speaks revision {next}", ferry_proto::PROTOCOL);
    assert_status(&refused, Code::FailedPrecondition, &[&said, "upgrade the scheduler first"]);
    let allocate = |protocol: u32| {
        rt.block_on(bounded(async {
            let mut client = SchedulerClient::new(connect_trusting(&scheduler.url(), None).await.expect("scheduler"));
            let mut request = tonic::Request::new(v1::AllocateRequest {
                toolchain: Some(to_digest([9; 32])),
                client_id: "t".into(),
                protocol,
            });
            request.metadata_mut().insert("authorization", bearer(CLIENT_TOKEN).parse().expect("header"));
            client.allocate(request).await.map(|_| ())
        }))
    };
    let refused = allocate(next).expect_err("a newer client");
    assert_status(&refused, Code::FailedPrecondition, &["the client speaks revision", "upgrade the scheduler first"]);
    allocate(ferry_proto::PROTOCOL).expect("this revision is served");
}

// ---- TLS and exposure --------------------------------------------------------------------------

#[test]
fn tls_serves_only_clients_that_trust_its_ca() {
    let mut world = World::new();
    let pki = Pki::new(&world.path().join("pki"));
    let tls = format!("[tls]\ncert = \"{}\"\nkey = \"{}\"\n", pki.cert.display(), pki.key.display());
    let config = write(&world, "scheduler.toml", &tls);
    let scheduler = world.scheduler(&["--config", utf8(&config)]);
    let https = format!("https://{}", scheduler.addr);

    world.set("FERRY_SCHEDULER", &https).set("FERRY_CA", &pki.ca);
    assert_eq!(workers(&status(&world)), Vec::<String>::new());

    unset(&mut world, "FERRY_CA");
    assert_refused(&ferry(&world, &["status", "--json"]), &["UnknownIssuer", "set FERRY_CA (or cluster.ca)"]);
    world.set("FERRY_CA", &pki.other_ca);
    assert_refused(&ferry(&world, &["status", "--json"]), &["UnknownIssuer", "set FERRY_CA (or cluster.ca)"]);
    world.set("FERRY_CA", &pki.ca).set("FERRY_SCHEDULER", format!("https://localhost:{}", port_of(&scheduler.addr)));
    assert_refused(&ferry(&world, &["status", "--json"]), &["not valid for name", "does not name this host"]);
    // Plain HTTP/2 (or a bare host:port) to the TLS port: an error that says what to do, never a
    // process killed by the closed connection's SIGPIPE without a word.
    for url in [scheduler.url(), scheduler.addr.clone()] {
        world.set("FERRY_SCHEDULER", &url);
        let plain = ferry(&world, &["status", "--json"]);
        assert_eq!(plain.status.code(), Some(1), "{url}: {}", text(&plain.stderr));
        assert!(text(&plain.stdout).is_empty(), "{}", text(&plain.stdout));
        assert!(text(&plain.stderr).contains("the URL must start with https://"), "{url}: {}", text(&plain.stderr));
    }

    // A worker that trusts the CA (its `ca` key) registers over TLS, and serves TLS itself: the
    // client speaks https to workers when it does to the scheduler.
    unset(&mut world, "FERRY_CA");
    let worker_config = write(&world, "worker.toml", &format!("ca = \"{}\"\n{tls}", pki.ca.display()));
    let worker = world.worker("w1", &https, &["--config", utf8(&worker_config)]);
    world.set("FERRY_SCHEDULER", &https).set("FERRY_CA", &pki.ca);
    let registered = world.wait_for_status(Duration::from_secs(30), |s| !workers(s).is_empty());
    assert_eq!(workers(&registered), std::slice::from_ref(&worker.addr));

    let rt = runtime();
    let scheduler_https = format!("https://{}", scheduler.addr);
    let grant = rt.block_on(async {
        let channel = connect_trusting(&scheduler_https, Some(&pki.ca)).await.expect("scheduler over TLS");
        allocate_as(SchedulerClient::new(channel)).await.grant
    });
    let (https, http) = (format!("https://{}", worker.addr), format!("http://{}", worker.addr));
    let call = |url: &str, ca: Option<&Path>| {
        rt.block_on(bounded(find_missing_as(url, ca, None, Some(&grant), vec![[1; 32]])))
    };
    assert_eq!(call(&https, Some(&pki.ca)).expect("FindMissing over TLS"), [[1; 32]]);
    let err = call(&https, None).expect_err("TLS without the CA");
    assert!(err.message().contains("UnknownIssuer"), "{err:?}");
    let err = call(&https, Some(&pki.other_ca)).expect_err("TLS with another CA");
    assert!(err.message().contains("UnknownIssuer"), "{err:?}");
    call(&http, None).expect_err("plain HTTP/2 to the worker's TLS port worked");
}

#[test]
fn a_scheduler_on_a_non_loopback_address_needs_tls_and_tokens_or_insecure() {
    let world = World::new();
    let refused = serve_at_any_address(&world, "ferry-scheduler", None);
    assert_exposure_refused(&refused);
    let tokens_only = write(&world, "tokens.toml", &tokens_toml(&[(CLIENT_TOKEN, "client")]));
    assert_exposure_refused(&serve_at_any_address(&world, "ferry-scheduler", Some(&tokens_only)));

    let insecure = write(&world, "insecure.toml", "insecure = true\n");
    let scheduler = world.scheduler_at("0.0.0.0:0", &["--config", utf8(&insecure)]);
    assert!(scheduler.addr.starts_with("0.0.0.0:"), "{}", scheduler.addr);
    let log = scheduler.log_text();
    assert!(log.contains("WARN") && log.contains("INSECURE"), "no loud warning in the log:\n{log}");
    let port = scheduler.addr.rsplit(':').next().expect("port");
    let mut world = world;
    world.set("FERRY_SCHEDULER", format!("http://127.0.0.1:{port}"));
    assert_eq!(workers(&status(&world)), Vec::<String>::new(), "the insecure scheduler does not serve");
}

#[test]
fn a_worker_on_a_non_loopback_address_needs_tls_and_tokens_or_insecure() {
    let world = World::new();
    let insecure = write(&world, "insecure.toml", "insecure = true\n");
    let mut cmd = world.command(bin("ferry-worker"));
    cmd.args(["--scheduler", "http://127.0.0.1:9", "--listen", "0.0.0.0:0", "--config", utf8(&insecure), "--data-dir"])
        .arg(world.path().join("w1"));
    let worker = Daemon::start(cmd, world.path().join("w1.log"));
    wait_until(Duration::from_secs(10), "the insecure worker warns", || worker.log_text().contains("INSECURE"));
    let port = worker.addr.rsplit(':').next().expect("port");
    let url = format!("http://127.0.0.1:{port}");
    // It serves (and, with no scheduler to grant jobs, refuses every call for want of a grant).
    let refused = runtime().block_on(bounded(find_missing_as(&url, None, None, None, vec![[1; 32]])));
    assert_status(&refused.expect_err("a call without a grant"), Code::Unauthenticated, &["no job grant"]);

    // Like the scheduler, it must not announce an address it then refuses to serve: whatever
    // waits for its `listening on` line (a supervisor, this DSL) would take it for started.
    assert_exposure_refused(&serve_at_any_address(&world, "ferry-worker", None));
}

// ---- toolchain uploads -------------------------------------------------------------------------

#[test]
fn an_upload_that_is_not_its_claimed_toolchain_is_refused_and_nothing_is_stored() {
    let world = World::new();
    let packaged = packaged();
    let archive = PathBuf::from(packaged["archive"].as_str().expect("archive path"));
    let size = fs::metadata(&archive).expect("archive").len();
    let real = digest_from_hex(packaged["id"].as_str().expect("id"));
    let claimed = *blake3::hash(b"some other toolchain").as_bytes();
    let scheduler = world.scheduler(&[]);
    let api = SchedulerApi::connect(&scheduler);
    let store = world.path().join("scheduler/toolchains");

    let err = api.upload(claimed, size, &archive, None).expect_err("an archive under another id was stored");
    assert_status(&err, Code::InvalidArgument, &[&hex(&claimed), "is not toolchain"]);
    assert!(!api.has(claimed) && !api.has(real));
    assert_store_empty(&store);

    let err = api.upload(real, size, &archive, Some(1 << 20)).expect_err("a truncated archive was stored");
    assert_status(&err, Code::InvalidArgument, &[&format!("ended after 1048576 of the {size} bytes")]);
    assert!(!api.has(real));
    assert_store_empty(&store);

    let err = api.upload(real, 1 << 20, &archive, Some(2 << 20)).expect_err("an overlong archive was stored");
    assert_status(&err, Code::InvalidArgument, &["larger than the 1048576 bytes announced"]);
    assert!(!api.has(real));
    assert_store_empty(&store);

    // Control: the same bytes under their own id are what the scheduler was waiting for.
    assert!(api.upload(real, size, &archive, None).expect("the real upload"), "not stored");
    assert!(api.has(real));
    let mut stored = files_in(&store);
    stored.sort();
    assert_eq!(stored, [format!("{}.json", hex(&real)), format!("{}.tar.gz", hex(&real))]);
    assert_eq!(files_in(&store.join("tmp")), Vec::<String>::new());
}

// ---- bounded work from the network -------------------------------------------------------------

/// The scheduler's peak memory (`VmHWM`) may grow by this much under the attacks below: the
/// documented bound of `cache_concurrency` (16) transfers of at most ~7 MiB each, plus slack for
/// the 500 waiting requests and the allocator.
const MEMORY_BOUND: u64 = 160 << 20;

/// A gzip bomb uploaded as a toolchain, then 500 concurrent `CacheGet`s of a 100 MB entry by slow
/// readers: the bomb is refused without being inflated, at most `cache_concurrency` transfers are
/// served at once (the rest are told to come back, clearly), every entry that arrives is whole,
/// and the scheduler's peak memory stays within its documented bound — far below what inflating
/// the bomb or holding a few of the entries whole would take. Prints the peak for the notes.
#[test]
fn the_scheduler_stays_within_its_memory_bound_under_a_bomb_and_a_flood() {
    let world = World::new();
    // Every reader here is one caller (no tokens, one address): let it take all 16 transfers, the
    // bound under test.
    let config = write(&world, "scheduler.toml", "cache_concurrency_per_caller = 16\n");
    let scheduler = world.scheduler(&["--config", utf8(&config)]);
    let api = SchedulerApi::connect(&scheduler);
    let peak = || {
        let status = fs::read_to_string(format!("/proc/{}/status", scheduler.child.id())).expect("status");
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM").to_owned();
        line.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()).expect("kB") << 10
    };
    api.has([0; 32]); // the scheduler has served a call
    let idle = peak();

    // A tar whose first entry is a 10 MiB manifest, then zeros: 512 MiB in all, deflated into
    // one gzip member of well under a megabyte.
    let bomb = world.path().join("bomb.tar.gz");
    let mut gz = flate2::write::GzEncoder::new(fs::File::create(&bomb).expect("create"), flate2::Compression::best());
    let mut header = tar::Header::new_gnu();
    header.set_path(".ferry/manifest").expect("path");
    header.set_size(10 << 20);
    header.set_mode(0o644);
    header.set_cksum();
    std::io::Write::write_all(&mut gz, header.as_bytes()).expect("deflate");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..512 {
        std::io::Write::write_all(&mut gz, &zeros).expect("deflate");
    }
    gz.finish().expect("finish");
    let size = fs::metadata(&bomb).expect("bomb").len();
    assert!(size < 1 << 20, "the bomb is {size} bytes");
    let claimed = *blake3::hash(b"a toolchain").as_bytes();
    let err = api.upload(claimed, size, &bomb, None).expect_err("the bomb was stored");
    // Refused as soon as its bytes stop making sense (each member may inflate to one 1 MiB chunk
    // at most, the unit test in the archive reader shows, so nothing gets far).
    assert_status(&err, Code::InvalidArgument, &["is not toolchain", "archive is corrupt"]);
    assert_store_empty(&world.path().join("scheduler/toolchains"));
    let after_bomb = peak();
    assert!(after_bomb - idle < MEMORY_BOUND, "the bomb grew the scheduler by {} MiB", (after_bomb - idle) >> 20);

    // A 100 MB entry (incompressible bytes), stored once.
    let mut content = vec![0u8; 100_000_000];
    blake3::Hasher::new().update(b"content").finalize_xof().fill(&mut content);
    let key = ferry_cache::CacheKey(*blake3::hash(b"a big entry").as_bytes());
    let output = ferry_cache::CompileOutput {
        files: vec![ferry_cache::OutputFile { path: "/big.rlib".into(), executable: false, bytes: content.into() }],
        ..Default::default()
    };
    // Signed by a writer the scheduler trusts (it registers: loopback grants every role).
    let (writer, _) = ferry_cache::Signer::generate().expect("a writer key");
    let request = v1::RegisterWriterRequest { public_key: writer.public().0.to_vec(), name: "test".into() };
    let mut client = api.client.clone();
    assert!(api.rt.block_on(client.register_writer(request)).expect("RegisterWriter").into_inner().trusted);
    let entry = ferry_cache::sign(&ferry_cache::Entry::encode_result(key, [1; 32], &output), &writer);
    drop(output);
    let expected = blake3::hash(&entry);
    let header = v1::CacheHeader { key: Some(to_digest(key.0)), size: entry.len() as u64 };
    let messages: Vec<v1::CacheUpload> =
        std::iter::once(v1::CacheUpload { kind: Some(v1::cache_upload::Kind::Header(header)) })
            .chain(
                entry.chunks(1 << 20).map(|c| v1::CacheUpload { kind: Some(v1::cache_upload::Kind::Data(c.to_vec())) }),
            )
            .collect();
    drop(entry);
    let mut client = api.client.clone();
    let published = api.rt.block_on(bounded(async move {
        Ok(client.cache_put(tokio_stream::iter(messages)).await?.into_inner().published)
    }));
    assert!(published.expect("CachePut"), "the entry was not published");
    let after_put = peak();
    assert!(
        after_put - idle < MEMORY_BOUND,
        "storing the entry grew the scheduler by {} MiB",
        (after_put - idle) >> 20
    );

    // The flood: 500 readers on 10 connections, each taking the first piece, then holding its
    // stream for 3 s before reading the rest.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let url = scheduler.url();
    let outcomes: Vec<Result<blake3::Hash, Status>> = rt.block_on(async move {
        let mut channels = Vec::new();
        for _ in 0..10 {
            channels.push(connect(&url).await.expect("connect"));
        }
        let readers: Vec<_> = (0..500)
            .map(|i| {
                let mut client = SchedulerClient::new(channels[i % 10].clone()).max_decoding_message_size(64 << 20);
                tokio::spawn(async move {
                    let request = v1::CacheKeyRef { key: Some(to_digest(key.0)) };
                    let mut stream = client.cache_get(request).await?.into_inner();
                    let mut hasher = blake3::Hasher::new();
                    let first = stream.message().await?.ok_or_else(|| Status::data_loss("empty"))?;
                    hasher.update(&first.data);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    while let Some(chunk) = stream.message().await? {
                        hasher.update(&chunk.data);
                    }
                    Ok(hasher.finalize())
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for reader in readers {
            outcomes
                .push(tokio::time::timeout(Duration::from_secs(300), reader).await.expect("bounded").expect("task"));
        }
        outcomes
    });
    let whole = outcomes.iter().filter(|o| o.as_ref().is_ok_and(|h| *h == expected)).count();
    let mut refused = 0;
    for outcome in &outcomes {
        match outcome {
            Ok(h) => assert_eq!(*h, expected, "an entry arrived altered"),
            Err(s) => {
                assert_status(s, Code::ResourceExhausted, &["serving 16 transfers", "try again later"]);
                refused += 1;
            }
        }
    }
    let flood = peak();
    eprintln!(
        "scheduler VmHWM: idle {} MiB, after a 512 MiB gzip bomb {} MiB, after a 100 MB CachePut {} MiB, after 500 \
         CacheGets of it {} MiB ({whole} served whole, {refused} told to come back)",
        idle >> 20,
        after_bomb >> 20,
        after_put >> 20,
        flood >> 20
    );
    assert!(whole >= 16, "only {whole} readers were served");
    assert!(flood - idle < MEMORY_BOUND, "the flood grew the scheduler by {} MiB", (flood - idle) >> 20);
    // Still up and answering.
    assert!(!api.has(claimed));
}

/// The shared tier cannot be starved: 16 `CacheGet` streams of a 24 MB entry that one `client`
/// token opens and never reads take at most that token's share of the transfers (the rest are told
/// to come back), an honest client (another token) reads the entry whole meanwhile and a
/// `cache-write` client stores one, a stalled reader is cut off after `cache_send_timeout_ms` (it
/// hears DEADLINE_EXCEEDED, never a truncated entry) so its share is free again, and a `CachePut`
/// whose writer goes quiet is abandoned after `cache_idle_timeout_ms`, leaving no temp file.
#[test]
fn stalled_readers_and_writers_cannot_starve_the_shared_tier() {
    const OTHER_CLIENT: &str = "client-token-second-0b9f4e";
    const CI_TOKEN: &str = "cache-write-token-61d2c8a0";
    let world = World::new();
    let mut toml = tokens_toml(&[(CLIENT_TOKEN, "client"), (OTHER_CLIENT, "client"), (CI_TOKEN, "cache-write")]);
    toml.insert_str(0, "cache_concurrency = 4\ncache_send_timeout_ms = 5000\ncache_idle_timeout_ms = 3000\n");
    let config = write(&world, "scheduler.toml", &toml);
    let scheduler = world.scheduler(&["--config", utf8(&config)]);
    let rt = runtime();
    let client = |token: &'static str| {
        let url = scheduler.url();
        rt.block_on(async move {
            let channel = connect_trusting(&url, None).await.expect("scheduler");
            let token: tonic::metadata::MetadataValue<_> = bearer(token).parse().expect("header");
            SchedulerClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", token.clone());
                Ok(r)
            })
            .max_decoding_message_size(64 << 20)
        })
    };
    // A writer the scheduler trusts, and a 24 MB entry it signed (incompressible bytes).
    let (writer, _) = ferry_cache::Signer::generate().expect("a writer key");
    let mut ci = client(CI_TOKEN);
    let request = v1::RegisterWriterRequest { public_key: writer.public().0.to_vec(), name: "ci".into() };
    assert!(rt.block_on(ci.register_writer(request)).expect("RegisterWriter").into_inner().trusted);
    let entry = |name: &str| {
        let mut content = vec![0u8; 24_000_000];
        blake3::Hasher::new().update(name.as_bytes()).finalize_xof().fill(&mut content);
        let key = ferry_cache::CacheKey(*blake3::hash(name.as_bytes()).as_bytes());
        let output = ferry_cache::CompileOutput {
            files: vec![ferry_cache::OutputFile { path: "/big.rlib".into(), executable: false, bytes: content.into() }],
            ..Default::default()
        };
        (key, ferry_cache::sign(&ferry_cache::Entry::encode_result(key, [1; 32], &output), &writer))
    };
    let put = |ci: &mut SchedulerClient<_>, key: ferry_cache::CacheKey, entry: &[u8]| {
        let header = v1::CacheHeader { key: Some(to_digest(key.0)), size: entry.len() as u64 };
        let messages: Vec<v1::CacheUpload> =
            std::iter::once(v1::CacheUpload { kind: Some(v1::cache_upload::Kind::Header(header)) })
                .chain(
                    entry
                        .chunks(1 << 20)
                        .map(|c| v1::CacheUpload { kind: Some(v1::cache_upload::Kind::Data(c.to_vec())) }),
                )
                .collect();
        rt.block_on(bounded(
            async move { Ok(ci.cache_put(tokio_stream::iter(messages)).await?.into_inner().published) },
        ))
    };
    let (key, bytes) = entry("the first entry");
    assert!(put(&mut ci, key, &bytes).expect("CachePut"), "not published");
    let expected = blake3::hash(&bytes);
    let read_whole = |c: &mut SchedulerClient<_>| -> Result<blake3::Hash, Status> {
        rt.block_on(bounded(async {
            let mut stream = c.cache_get(v1::CacheKeyRef { key: Some(to_digest(key.0)) }).await?.into_inner();
            let mut hasher = blake3::Hasher::new();
            while let Some(chunk) = stream.message().await? {
                hasher.update(&chunk.data);
            }
            Ok(hasher.finalize())
        }))
    };

    // The attacker: 16 streams on its own connection, opened at once, none read.
    let attacker = client(CLIENT_TOKEN);
    let opened: Vec<Result<tonic::Streaming<v1::Chunk>, Status>> = rt.block_on(async {
        let calls = (0..16).map(|_| {
            let mut c = attacker.clone();
            tokio::spawn(
                async move { Ok(c.cache_get(v1::CacheKeyRef { key: Some(to_digest(key.0)) }).await?.into_inner()) },
            )
        });
        let mut opened = Vec::new();
        for call in calls.collect::<Vec<_>>() {
            opened.push(tokio::time::timeout(Duration::from_secs(30), call).await.expect("bounded").expect("task"));
        }
        opened
    });
    let (mut held, refused): (Vec<_>, Vec<_>) = opened.into_iter().partition(Result::is_ok);
    assert_eq!(held.len(), 2, "the attacker holds its share of 4 transfers, half");
    for r in &refused {
        assert_status(r.as_ref().expect_err("refused"), Code::ResourceExhausted, &["this caller already has 2"]);
    }
    // Meanwhile an honest reader and an honest writer are served.
    let started = Instant::now();
    assert_eq!(read_whole(&mut client(OTHER_CLIENT)).expect("the honest CacheGet"), expected);
    let (second, bytes) = entry("the second entry");
    assert!(put(&mut ci, second, &bytes).expect("the honest CachePut"), "not published");
    assert!(started.elapsed() < Duration::from_secs(5), "not served while the stalled streams held their share");
    // Past the deadline the stalled streams are cut off: what they get is a clear error after a
    // part of the entry, never an end that looks whole.
    std::thread::sleep(Duration::from_secs(6));
    for stream in &mut held {
        let stream = stream.as_mut().expect("held");
        let ended = rt.block_on(bounded(async {
            let mut got = 0usize;
            while let Some(chunk) = stream.message().await? {
                got += chunk.data.len();
            }
            Ok(got)
        }));
        let err = ended.expect_err("a stalled reader got an end as if the entry were whole");
        assert_status(&err, Code::DeadlineExceeded, &["took no piece", "cache_send_timeout_ms"]);
    }
    // Its share is free again.
    assert_eq!(read_whole(&mut attacker.clone()).expect("the attacker's share was not freed"), expected);

    // A writer that sends a header and then nothing is abandoned, and leaves no temp file.
    let (third, bytes) = entry("the third entry");
    let mut quiet = ci.clone();
    let header = v1::CacheHeader { key: Some(to_digest(third.0)), size: bytes.len() as u64 };
    let abandoned = rt.block_on(bounded(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(v1::CacheUpload { kind: Some(v1::cache_upload::Kind::Header(header)) }).await.expect("send");
        let answer = quiet.cache_put(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        drop(tx);
        Ok(answer?.into_inner().published)
    }));
    assert_status(
        &abandoned.expect_err("a quiet writer was waited for"),
        Code::DeadlineExceeded,
        &["no message of the entry", "cache_idle_timeout_ms"],
    );
    let tmp = world.path().join("scheduler/cache/tmp");
    wait_until(Duration::from_secs(10), "the abandoned upload's temp file is removed", || {
        fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0
    });
    // And its place is free: the same entry, sent in full, is stored.
    assert!(put(&mut ci, third, &bytes).expect("CachePut after the abandoned one"), "not published");
}

// ---- the sandbox, through the worker -----------------------------------------------------------

#[test]
fn attacks_from_a_proc_macro_are_contained_and_the_worker_keeps_serving() {
    let cluster = Cluster::new(SANDBOX_LIMITS);
    let world = &cluster.world;
    cluster.assert_still_serves(); // also fetches and unpacks the toolchain once

    // The network: a listener on the host's loopback is out of reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let address = listener.local_addr().expect("address").to_string();
    let connect = Job::attack(
        world,
        "connect",
        &r#"match std::net::TcpStream::connect_timeout(&"@ADDR@".parse().unwrap(), std::time::Duration::from_secs(3)) {
            Ok(_) => "pub fn connected() {}".parse().unwrap(),
            Err(e) => panic!("connect @ADDR@: {e}"),
        }"#
        .replace("@ADDR@", &address),
    );
    cluster.run(&connect).assert_macro_failed(&format!("connect {address}:"));
    // The worker's log keeps what the failed job said (a `discrepancy` is diagnosed from it).
    let log = fs::read_to_string(world.path().join("w1.log")).unwrap_or_default();
    let failed =
        log.lines().find(|l| l.contains("a job failed")).unwrap_or_else(|| panic!("no failed job logged:\n{log}"));
    assert!(failed.contains("proc macro panicked") && failed.contains(&format!("connect {address}")), "{failed}");
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock), "the job connected");
    ok(connect.run_on_host());
    assert!(listener.accept().is_ok(), "control: the macro connects on the host");
    cluster.assert_still_serves();

    // Reading host files: the system's, the worker's own data, the scheduler's, the world's.
    let secret = write(world, "secret.txt", "a secret the job must not see");
    let benign = hex(&Job::benign_digest());
    let blob = cluster.worker_data.join("blobs").join(&benign[..2]).join(&benign);
    let record = world.path().join("scheduler/toolchains").join(format!("{}.json", hex(&cluster.toolchain)));
    let paths = ["/etc/hostname".to_owned(), path_string(&blob), path_string(&record), path_string(&secret)];
    for path in &paths {
        assert!(Path::new(path).is_file(), "{path} is not there to steal");
    }
    let read = Job::attack(
        world,
        "read",
        &r#"let mut errors = Vec::new();
        for path in @PATHS@ {
            match std::fs::read(path) {
                Ok(bytes) => return format!("pub const LEAKED: &[u8] = &{bytes:?};").parse().unwrap(),
                Err(e) => errors.push(format!("read {path}: {e}")),
            }
        }
        panic!("{}", errors.join("; "))"#
            .replace("@PATHS@", &format!("{paths:?}")),
    );
    let run = cluster.run(&read);
    run.assert_macro_failed("read /etc/hostname");
    for path in &paths {
        assert!(run.stderr.contains(&format!("read {path}: No such file or directory")), "{path}: {run:#?}");
    }
    ok(read.run_on_host());
    cluster.assert_still_serves();

    // Writing outside the job's own tree: the system, the root, the worker's data, the world.
    let marker = format!("ferry-security-{}", std::process::id());
    let targets = [
        format!("/usr/{marker}"),
        format!("/{marker}"),
        path_string(&cluster.worker_data.join(&marker)),
        path_string(&cluster.worker_data.join("blobs/tmp").join(&marker)),
        path_string(&world.path().join(&marker)),
    ];
    let write_job = Job::attack(
        world,
        "write",
        &r#"let report: Vec<String> = @TARGETS@.iter()
            .map(|path| match std::fs::write(path, "evil") {
                Ok(()) => format!("write {path}: ok"),
                Err(e) => format!("write {path}: {e}"),
            })
            .collect();
        panic!("{}", report.join("; "))"#
            .replace("@TARGETS@", &format!("{targets:?}")),
    );
    let run = cluster.run(&write_job);
    run.assert_macro_failed("write /usr/");
    assert!(run.stderr.contains(&format!("write /usr/{marker}: Read-only file system")), "{run:#?}");
    assert!(run.stderr.contains(&format!("write /{marker}: Read-only file system")), "{run:#?}");
    for target in &targets {
        assert!(!Path::new(target).exists(), "{target} was written on the host");
    }
    cluster.assert_still_serves();

    // Tampering with its own inputs, which may be hard links into the worker's blob store.
    let input = world.path().join("job-tamper/lib.rs");
    let tamper = Job::attack(
        world,
        "tamper",
        &r#"let path = "@INPUT@";
        let opened = match std::fs::OpenOptions::new().append(true).open(path) {
            Ok(_) => "open for writing: ok".to_owned(),
            Err(e) => format!("open for writing: {e}"),
        };
        let mode = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o666);
        let chmod = match std::fs::set_permissions(path, mode) {
            Ok(()) => "chmod: ok".to_owned(),
            Err(e) => format!("chmod: {e}"),
        };
        panic!("{opened}; {chmod}")"#
            .replace("@INPUT@", &path_string(&input)),
    );
    let run = cluster.run(&tamper);
    run.assert_macro_failed("open for writing: Permission denied");
    assert!(run.stderr.contains("chmod: Operation not permitted"), "{run:#?}");
    let digest = blake3::hash(&fs::read(&input).expect("the input"));
    let stored = hex(digest.as_bytes());
    let blob = cluster.worker_data.join("blobs").join(&stored[..2]).join(&stored);
    assert_eq!(blake3::hash(&fs::read(&blob).expect("the input's blob")), digest, "the blob store was changed");
    cluster.assert_still_serves();

    // Limits. A process count no other process uses, to find leftovers by their command line.
    let sleeper = (1_000_000 + std::process::id()).to_string();
    let fork = Job::attack(
        world,
        "fork",
        &r#"let mut children = Vec::new();
        while children.len() < 1000 {
            match std::process::Command::new("/usr/bin/sleep").arg("@SLEEP@").spawn() {
                Ok(child) => children.push(child),
                Err(e) => panic!("spawn after {} children: {e}", children.len()),
            }
        }
        "pub fn unbounded() {}".parse().unwrap()"#
            .replace("@SLEEP@", &sleeper),
    );
    let run = cluster.run(&fork);
    run.assert_limit("processes");
    assert!(run.stderr.contains("Resource temporarily unavailable"), "{run:#?}");
    let spawned: usize =
        run.stderr.split("spawn after ").nth(1).and_then(|s| s.split(' ').next()?.parse().ok()).unwrap();
    assert!(spawned < 128, "{spawned} children under a limit of 128");
    assert_no_processes_with(&["/usr/bin/sleep", &sleeper]);
    cluster.assert_still_serves();

    // Two threads, so CPU time outruns the wall clock even on a busy machine.
    let spin = Job::attack(
        world,
        "spin",
        r#"fn spin() { let mut n = 0u64; loop { n = std::hint::black_box(n.wrapping_add(1)); } }
        std::thread::spawn(spin);
        spin();
        unreachable!()"#,
    );
    let run = cluster.run(&spin);
    run.assert_limit("cpu time");
    assert!(run.elapsed < Duration::from_secs(30), "{run:#?}");
    cluster.assert_still_serves();

    let sleep_forever = (2_000_000 + std::process::id()).to_string();
    let sleep = Job::attack(
        world,
        "sleep",
        &r#"let _ = std::process::Command::new("/usr/bin/sleep").arg("@SLEEP@").status();
        loop { std::thread::sleep(std::time::Duration::from_secs(1000)); }"#
            .replace("@SLEEP@", &sleep_forever),
    );
    let run = cluster.run(&sleep);
    run.assert_limit("wall-clock time");
    assert!(run.elapsed >= Duration::from_secs(8) && run.elapsed < Duration::from_secs(30), "{run:#?}");
    assert_no_processes_with(&["/usr/bin/sleep", &sleep_forever]);
    cluster.assert_still_serves();

    // Zeroed blocks: if the limit were missing, the macro would stop at 4 GiB of address space
    // (untouched, so no real memory) and the compile would succeed.
    let allocate = Job::attack(
        world,
        "allocate",
        r#"let mut blocks = Vec::new();
        while blocks.len() < 64 { blocks.push(vec![0u8; 64 << 20]); }
        "pub fn unbounded() {}".parse().unwrap()"#,
    );
    let run = cluster.run(&allocate);
    run.assert_limit("memory");
    assert!(run.stderr.contains("memory allocation of 67108864 bytes failed"), "{run:#?}");
    cluster.assert_still_serves();

    // A symlink to a host file in place of the early `.rmeta`, announced as rustc would (the
    // announcement is what makes the worker read it while the job runs): nothing is read through
    // it, and the job's other outputs still arrive.
    let mut swap = Job::attack(
        world,
        "swap",
        &r#"let out = "@OUT@";
        std::fs::create_dir_all(out).unwrap();
        std::os::unix::fs::symlink("@SECRET@", format!("{out}/libvictim.rmeta")).unwrap();
        eprintln!("{{\"$message_type\":\"artifact\",\"artifact\":\"{out}/libvictim.rmeta\",\"emit\":\"metadata\"}}");
        "pub fn swapped() {}".parse().unwrap()"#
            .replace("@OUT@", &path_string(&world.path().join("job-swap/out")))
            .replace("@SECRET@", &path_string(&secret)),
    );
    swap.args.insert(0, "--emit=link,metadata".into());
    swap.more_outputs.push(swap.dir.join("out/libvictim.rmeta"));
    let run = cluster.run(&swap);
    assert!(run.stderr.contains(r#""emit":"metadata""#), "the macro did not announce: {run:#?}");
    let secret_bytes = fs::read(&secret).expect("the secret");
    for (path, bytes) in &run.outputs {
        assert!(!contains(bytes, &secret_bytes), "{path} carried the host file: {run:#?}");
    }
    // The planted link is never followed. rustc itself writes its metadata to that path later
    // (replacing the link), and a worker that reads the path only then returns rustc's real
    // metadata: which one happens is timing, and either is safe.
    if let Some(rmeta) = run.outputs.get(&path_string(&swap.dir.join("out/libvictim.rmeta"))) {
        assert!(rmeta.starts_with(b"rust\0\0\0"), "the rmeta returned is not rustc's metadata: {run:#?}");
    }
    cluster.assert_still_serves();

    // The rest hold per job, not per process, where the worker has them (root here, as in CI):
    // six processes of 400 MB each fit a per-process limit of 2 GiB, not a job's cgroup of 2 GiB.
    // (Each `dd` holds its 400 MiB block until all six have filled theirs — the reader waits for
    // the others' first byte, at most 5 s — so they overlap whatever the machine's load.)
    let processes = Job::attack(
        world,
        "processes",
        r#"let dir = format!("/tmp/ferry-barrier-{}", std::process::id());
        std::fs::create_dir_all(&dir).unwrap();
        let children: Vec<_> = (0..6)
            .map(|i| std::process::Command::new("/usr/bin/bash")
                .args(["-o", "pipefail", "-c", "n=$1; /usr/bin/dd if=/dev/zero bs=400M count=1 status=none | { /usr/bin/head -c 1 > /dev/null; : > $2/filled.$n; for t in $(/usr/bin/seq 50); do f=($2/filled.*); [ ${#f[@]} -ge 6 ] && break; /usr/bin/sleep 0.1; done; /usr/bin/cat > /dev/null; }", "_", &i.to_string(), &dir])
                .spawn().unwrap())
            .collect();
        for mut child in children {
            let status = child.wait().unwrap();
            assert!(status.success(), "a child failed: {status}");
        }
        let _ = std::fs::remove_dir_all(&dir);
        "pub fn fits() {}".parse().unwrap()"#,
    );
    let run = cluster.run(&processes);
    run.assert_limit("memory");
    ok(processes.run_on_host());
    cluster.assert_still_serves();

    // Nine files under the per-file limit (10 MiB) fill the job's 64 MiB tmpfs.
    let fill = Job::attack(
        world,
        "fill",
        r#"for i in 0..9 { std::fs::write(format!("fill-{i}.bin"), vec![1u8; 9 << 20]).unwrap(); }
        "pub fn fits() {}".parse().unwrap()"#,
    );
    let run = cluster.run(&fill);
    run.assert_limit("disk space");
    assert!(run.stderr.contains("No space left on device"), "{run:#?}");
    let log = fs::read_to_string(world.path().join("w1.log")).unwrap_or_default();
    assert!(log.contains("each job runs in its own cgroup"), "{log}");
    assert!(log.contains("each job's directory is a tmpfs"), "{log}");
    cluster.assert_still_serves();
}

/// Job ids come from the client (normally from the scheduler's assignment, but the scheduler
/// numbers from 1 again after a restart, and nothing stops a client from choosing one). Two jobs
/// that share an id must still not share their files.
#[test]
fn concurrent_jobs_with_the_same_id_do_not_share_files() {
    let cluster = Cluster::new("slots = 2\n");
    let world = &cluster.world;
    cluster.assert_still_serves();
    let victim = Job::attack(
        world,
        "victim",
        r#"println!("victim running");
        std::thread::sleep(std::time::Duration::from_secs(3));
        "pub fn victim() {}".parse().unwrap()"#,
    );
    let victim_source = path_string(&victim.dir.join("lib.rs"));
    let snoop = Job::attack(
        world,
        "snoop",
        &r#"match std::fs::read_to_string("@PATH@") {
            Ok(text) => format!("pub const STOLEN: &str = {text:?};").parse().unwrap(),
            Err(e) => panic!("read @PATH@: {e}"),
        }"#
        .replace("@PATH@", &victim_source),
    );
    let (job_id, victim_run, snoop) = cluster.run_overlapping(&victim, &snoop);
    // A second job under the same grant is refused (a grant runs one job once); were it ever
    // accepted, it must not see the first's files.
    match snoop {
        Err(refused) => assert_status(&refused, Code::AlreadyExists, &[&job_id.to_string(), "already run"]),
        Ok(snoop_run) => {
            assert_ne!(snoop_run.finished().exit_code, Some(0), "the second job read the first's {victim_source}");
            snoop_run.assert_macro_failed(&format!("read {victim_source}: No such file or directory"));
        }
    }
    victim_run.assert_compiled();
    cluster.assert_clean();
}

// ---- timeouts that agree -----------------------------------------------------------------------

/// A job's first call starts the toolchain's fetch; the caller giving up (its deadline, cargo's
/// Ctrl-C) does not cancel it: the worker ends up holding the toolchain, completely unpacked, and
/// the next job finds it there.
#[test]
fn a_toolchain_fetch_outlives_the_call_that_started_it() {
    let cluster = Cluster::new("");
    let world = &cluster.world;
    let id = hex(&cluster.toolchain);
    let holds = |s: &Value| {
        s["workers"].as_array().is_some_and(|w| {
            w.iter().any(|w| w["toolchains"].as_array().is_some_and(|t| t.iter().any(|t| t == id.as_str())))
        })
    };
    assert!(!holds(&status(world)), "the worker already holds the toolchain: nothing to fetch");
    let job = Job::benign(world);
    cluster.upload_inputs(&job);
    let (job_id, grant) = cluster.worker.allocate();
    let request = granted(v1::RunJobRequest { job_id, ..job.request(cluster.toolchain, &cluster.root) }, &grant);
    let mut client = cluster.worker.client.clone();
    let gave_up = cluster.worker.rt.block_on(async move {
        // The call gives up after 100 ms, long before the fetch and unpacking are done...
        let gave_up = tokio::time::timeout(Duration::from_millis(100), client.run_job(request)).await.is_err();
        // ...and this runtime, which drives the connection, sends the cancellation.
        tokio::time::sleep(Duration::from_millis(500)).await;
        gave_up
    });
    assert!(gave_up, "the call answered within 100 ms: the fetch was not exercised");
    let status = world.wait_for_status(Duration::from_secs(120), holds);
    assert!(holds(&status), "the fetch died with the call: {status:#}");
    cluster.assert_still_serves();
}

/// A job whose client goes away (cargo's Ctrl-C, the client's deadline) is killed at once, its
/// processes with it, and its slot is free: not left to run to the wall clock.
#[test]
fn a_job_whose_client_goes_away_is_killed_at_once() {
    let cluster = Cluster::new("[sandbox]\nwall_clock_secs = 60\n");
    let world = &cluster.world;
    cluster.assert_still_serves(); // the toolchain is unpacked
    let marker = format!("{}", 7_000_000 + std::process::id());
    let job = Job::attack(
        world,
        "abandoned",
        &r#"let _ = std::process::Command::new("/usr/bin/sleep").arg("@SLEEP@").status();
        "pub fn never() {}".parse().unwrap()"#
            .replace("@SLEEP@", &marker),
    );
    cluster.upload_inputs(&job);
    let (job_id, grant) = cluster.worker.allocate();
    let request = granted(v1::RunJobRequest { job_id, ..job.request(cluster.toolchain, &cluster.root) }, &grant);
    let mut client = cluster.worker.client.clone();
    let running = |needle: &str| {
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| fs::read(e.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle)))
    };
    // The client reads the stream until the job's macro is running, then goes away.
    let watched = marker.clone();
    let left_at = cluster.worker.rt.block_on(async move {
        let events = client.run_job(request).await.expect("RunJob").into_inner();
        let started = Instant::now();
        while !running(&watched) {
            assert!(started.elapsed() < Duration::from_secs(30), "the job never started its sleep");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(events);
        let left_at = Instant::now();
        // This runtime drives the connection: it must run for the cancellation to be sent.
        tokio::time::sleep(Duration::from_millis(500)).await;
        left_at
    });
    assert_no_processes_with(&["/usr/bin/sleep", &marker]);
    cluster.assert_clean();
    let gone_after = left_at.elapsed();
    assert!(gone_after < Duration::from_secs(8), "the abandoned job ran on for {gone_after:?}");
    // Its slot is free: the worker (2 slots) runs two jobs at once right away.
    cluster.assert_still_serves();
}

/// On a worker, as on a client, what the observer cannot see into is never stored: a macro that
/// runs a statically linked program through `execveat`, one that uses a socket, and one whose
/// child cannot open the observation log each compile, the worker says why the observation is
/// incomplete, and it publishes none of them (an honest job's entries, published after them,
/// are the only ones in the shared tier).
#[test]
fn a_worker_never_publishes_what_its_observer_cannot_see_into() {
    let cluster = Cluster::new("");
    let world = &cluster.world;
    let dir = world.path().join("job-execveat");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("answer.rs"), "fn main() { std::process::exit(3) }\n").expect("write");
    let mut rustc = Command::new(sysroot().join("bin/rustc"));
    rustc.args(["-C", "target-feature=+crt-static", "-o"]).arg(dir.join("answer")).arg(dir.join("answer.rs"));
    ok(run_bounded(rustc, Duration::from_secs(120)));
    let mut execveat = Job::attack(
        world,
        "execveat",
        &r#"use std::ffi::{CString, c_char};
        unsafe extern "C" {
            fn fork() -> i32;
            fn execveat(d: i32, p: *const c_char, a: *const *const c_char, e: *const *const c_char, f: i32) -> i32;
            fn waitpid(p: i32, s: *mut i32, o: i32) -> i32;
            fn _exit(c: i32) -> !;
        }
        let prog = CString::new("@PROGRAM@").unwrap();
        let argv = [prog.as_ptr(), std::ptr::null()];
        let envp: [*const c_char; 1] = [std::ptr::null()];
        let mut status = 0;
        unsafe {
            let pid = fork();
            if pid == 0 { execveat(-100, prog.as_ptr(), argv.as_ptr(), envp.as_ptr(), 0); _exit(127); }
            waitpid(pid, &mut status, 0);
        }
        assert_eq!((status >> 8) & 0xff, 3, "the static program did not run");
        "pub fn ran() {}".parse().unwrap()"#
            .replace("@PROGRAM@", &path_string(&dir.join("answer"))),
    );
    execveat.inputs.push(dir.join("answer"));
    let socket = Job::attack(
        world,
        "socket",
        r#"let _ = std::net::TcpStream::connect(("127.0.0.1", 9));
        "pub fn asked() {}".parse().unwrap()"#,
    );
    let hidden = Job::attack(
        world,
        "hidden",
        r#"let out = std::process::Command::new("/bin/true")
            .env("FERRY_OBSERVE_LOG", "/nonexistent/ferry-observe.log")
            .status()
            .unwrap();
        assert!(out.success());
        "pub fn hid() {}".parse().unwrap()"#,
    );
    for (job, reason) in [(&execveat, "static-executable"), (&socket, "network-connect"), (&hidden, "unobserved-child")]
    {
        let run = cluster.run(job);
        run.assert_compiled();
        let observed = run.observed.as_ref().unwrap_or_else(|| panic!("{reason}: no observation: {run:#?}"));
        assert!(observed.incomplete.starts_with(reason), "{reason}: {observed:?}");
    }
    // Published in order: once the honest job's result and manifest are there, nothing else is.
    cluster.run(&Job::benign(world)).assert_compiled();
    let entries = || -> Vec<PathBuf> {
        let files = crate::wrapper::files_under(&world.path().join("scheduler/cache"));
        files.into_iter().filter(|p| p.file_name().is_some_and(|n| n.len() == 64)).collect()
    };
    wait_until(Duration::from_secs(30), "the worker publishes the honest job", || entries().len() >= 2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(entries().len(), 2, "{:?}", entries());
}

// ---- bad requests to the worker ----------------------------------------------------------------

#[test]
fn the_worker_refuses_bad_requests_clearly_and_leaves_nothing_behind() {
    let cluster = Cluster::without_toolchain();
    let world = &cluster.world;
    let job = Job::benign(world);
    cluster.upload_inputs(&job);
    let root = path_string(sysroot());
    let unknown = *blake3::hash(b"a toolchain nobody uploaded").as_bytes();
    let good = || job.request(unknown, &root);
    let with_input = |path: &str, digest: v1::Digest| {
        let mut r = good();
        r.inputs.push(v1::InputFile { path: path.to_owned(), digest: Some(digest), executable: false });
        r
    };
    let never_uploaded = to_digest(*blake3::hash(b"never uploaded").as_bytes());
    let short = v1::Digest { blake3: vec![7; 31] };
    let in_toolchain = format!("{root}/lib/evil.so");
    let cases: Vec<(&str, v1::RunJobRequest, Code, Vec<String>)> = vec![
        (
            "an input never uploaded",
            with_input("/srv/x.rs", never_uploaded.clone()),
            Code::FailedPrecondition,
            vec!["1 input blobs are missing".into()],
        ),
        (
            "a '..' input",
            with_input("/a/../b", never_uploaded.clone()),
            Code::InvalidArgument,
            vec!["'/a/../b'".into(), "'..' component".into()],
        ),
        (
            "an input in /etc",
            with_input("/etc/x", never_uploaded.clone()),
            Code::InvalidArgument,
            vec!["/etc/x is inside a system directory".into()],
        ),
        (
            "a relative input",
            with_input("a/b", never_uploaded.clone()),
            Code::InvalidArgument,
            vec!["'a/b'".into(), "not an absolute path".into()],
        ),
        (
            "an input in the toolchain",
            with_input(&in_toolchain, never_uploaded.clone()),
            Code::InvalidArgument,
            vec![format!("{in_toolchain} is inside the toolchain")],
        ),
        (
            "a 31-byte input digest",
            with_input("/srv/x.rs", short.clone()),
            Code::InvalidArgument,
            vec!["inputs.digest".into(), "32 bytes, not 31".into()],
        ),
        (
            "a 31-byte toolchain id",
            v1::RunJobRequest { toolchain: Some(short.clone()), ..good() },
            Code::InvalidArgument,
            vec!["'toolchain'".into(), "32 bytes, not 31".into()],
        ),
        (
            "no outputs",
            v1::RunJobRequest { outputs: vec![], ..good() },
            Code::InvalidArgument,
            vec!["at least one output".into()],
        ),
        (
            "an output in /usr",
            v1::RunJobRequest { outputs: vec!["/usr/x".into()], ..good() },
            Code::InvalidArgument,
            vec!["/usr/x is inside a system directory".into()],
        ),
        // The worker derives the outputs from the arguments: naming an input (here the crate's
        // own source) as an output would drop it from the manifest the worker publishes.
        (
            "an input named as an output",
            v1::RunJobRequest {
                outputs: [good().outputs, vec![path_string(&job.dir.join("lib.rs"))]].concat(),
                ..good()
            },
            Code::InvalidArgument,
            vec!["are not what the arguments produce".into(), path_string(&job.dir.join("out/libvictim.rlib"))],
        ),
        (
            "an output the arguments do not make",
            v1::RunJobRequest { outputs: vec![path_string(&job.dir.join("out/libother.rlib"))], ..good() },
            Code::InvalidArgument,
            vec!["are not what the arguments produce".into()],
        ),
        (
            "arguments ferry does not run remotely",
            v1::RunJobRequest { args: vec!["--print".into(), "sysroot".into()], ..good() },
            Code::InvalidArgument,
            vec!["the arguments are not a compile a worker runs".into()],
        ),
        (
            "an output that is also an input",
            {
                let mut r = good();
                r.args.extend(["-o".into(), path_string(&job.dir.join("lib.rs"))]);
                r.outputs = vec![path_string(&job.dir.join("lib.rs"))];
                r
            },
            Code::InvalidArgument,
            vec!["is both an input file and an output of the job".into()],
        ),
        (
            "another program",
            v1::RunJobRequest { program: "/usr/bin/rustc".into(), ..good() },
            Code::InvalidArgument,
            vec!["'program' must be the toolchain's bin/rustc".into()],
        ),
        (
            "a program reached through '..'",
            v1::RunJobRequest { program: format!("{root}/bin/../../../../bin/sh"), ..good() },
            Code::InvalidArgument,
            vec!["'program'".into()],
        ),
        (
            "a toolchain root with '..'",
            v1::RunJobRequest {
                toolchain_root: "/opt/../etc".into(),
                program: "/opt/../etc/bin/rustc".into(),
                ..good()
            },
            Code::InvalidArgument,
            vec!["'toolchain_root'".into(), "'..' component".into()],
        ),
        // Trees that cannot be built are the client's fault, refused before the job runs (they
        // used to fail while placing inputs, as the worker's fault, and three of them
        // quarantined it).
        (
            "an input beneath an input file",
            with_input(&format!("{}/x.rs", path_string(&job.dir.join("lib.rs"))), never_uploaded.clone()),
            Code::InvalidArgument,
            vec![format!("{} is an input file of the job, but", path_string(&job.dir.join("lib.rs")))],
        ),
        (
            "an input where a directory belongs",
            with_input(&path_string(&job.dir.join("out")), never_uploaded.clone()),
            Code::InvalidArgument,
            vec![format!("{} is both an input file and a directory", path_string(&job.dir.join("out")))],
        ),
        (
            "the working directory beneath an input file",
            {
                let mut r = good();
                r.cwd = format!("{}/sub", path_string(&job.dir.join("lib.rs")));
                r.args.extend(["-o".into(), path_string(&job.dir.join("out/libvictim.rlib"))]);
                r
            },
            Code::InvalidArgument,
            vec!["is an input file of the job, but".into()],
        ),
        (
            "a 256-byte path component",
            with_input(&format!("/srv/{}", "x".repeat(256)), never_uploaded.clone()),
            Code::InvalidArgument,
            vec!["a component longer than 255 bytes".into()],
        ),
        ("an unknown toolchain", good(), Code::Unavailable, vec![hex(&unknown), "is not stored here".into()]),
    ];
    // The loader's and libc's variables would run code or read files no key covers.
    let with_env = |name: &str, value: &str| {
        let mut r = good();
        r.env.push(v1::EnvVar { name: name.into(), value: value.into() });
        r
    };
    let mut cases = cases;
    for (name, value) in [
        ("LD_PRELOAD", "/tmp/evil.so"),
        ("LD_LIBRARY_PATH", "/tmp/forged-driver"),
        ("LD_AUDIT", "/tmp/evil.so"),
        ("GCONV_PATH", "/tmp/gconv"),
        ("MALLOC_CHECK_", "3"),
        ("GLIBC_TUNABLES", "glibc.malloc.check=3"),
        ("FERRY_OBSERVE_LOG", "/tmp/x"),
    ] {
        cases.push((
            "a loader variable",
            with_env(name, value),
            Code::InvalidArgument,
            vec![format!("environment variable '{name}' is not allowed in a job")],
        ));
    }
    for (what, request, code, needles) in cases {
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let err = cluster.worker.run_job(request).expect_err(what);
        assert_status(&err, code, &needles);
        cluster.assert_clean();
    }
    // None of that is this worker's failure: the scheduler counts none and quarantines nothing.
    let status = cluster.world.ferry_json(&["status", "--json"]);
    let workers = status["workers"].as_array().expect("workers");
    assert!(workers.len() == 1 && workers[0]["failures"] == 0 && workers[0]["quarantined_ms"] == 0, "{status:#}");
    // A job id other than the one granted.
    let (granted_id, grant) = cluster.worker.allocate();
    let other = v1::RunJobRequest { job_id: granted_id + 1, ..good() };
    let err = cluster.worker.run_job_granted(other, &grant).expect_err("a job it was not granted");
    assert_status(
        &err,
        Code::PermissionDenied,
        &[&format!("the grant is for job {granted_id}, not job {}", granted_id + 1)],
    );
    cluster.assert_clean();
    assert_eq!(files_in(&cluster.worker_data.join("toolchains")), Vec::<String>::new(), "a fetch left something");

    // Blobs whose bytes are not what their digest says, or that never end, are not stored.
    let claimed = *blake3::hash(b"the claimed content").as_bytes();
    let chunk =
        |digest: v1::Digest, data: &[u8], last: bool| v1::BlobChunk { digest: Some(digest), data: data.to_vec(), last };
    let err = cluster.worker.upload(vec![chunk(to_digest(claimed), b"other content", true)]).expect_err("stored");
    assert_status(&err, Code::InvalidArgument, &[&format!("not the claimed {}", hex(&claimed))]);
    let real = *blake3::hash(b"real content").as_bytes();
    let err = cluster.worker.upload(vec![chunk(to_digest(real), b"real content", false)]).expect_err("stored");
    assert_status(&err, Code::InvalidArgument, &["ended inside a blob"]);
    let err = cluster.worker.upload(vec![chunk(short.clone(), b"x", true)]).expect_err("stored");
    assert_status(&err, Code::InvalidArgument, &["digest", "32 bytes, not 31"]);
    let err = cluster.worker.find_missing(vec![short]).expect_err("a short digest was looked up");
    assert_status(&err, Code::InvalidArgument, &["digests", "32 bytes, not 31"]);
    assert_eq!(cluster.worker.find_missing_digests(&[claimed, real]), [claimed, real]);
    cluster.assert_clean();

    // One message over the 16 MiB limit.
    let big = vec![3u8; 17 << 20];
    let big_digest = *blake3::hash(&big).as_bytes();
    let err = cluster.worker.upload(vec![chunk(to_digest(big_digest), &big, true)]).expect_err("a 17 MiB message");
    assert!(matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted), "{err:?}");
    assert!(err.message().contains("too large") || err.message().contains("limit"), "{err:?}");
    assert_eq!(cluster.worker.find_missing_digests(&[big_digest]), [big_digest]);
    cluster.assert_clean();

    // Bounded: one FindMissing names at most 65536 digests, and one job receives at most two
    // uploads at once (each holds a temp file), the rest refused while those two hang open.
    let many: Vec<v1::Digest> = (0..65_537u32).map(|i| to_digest(*blake3::hash(&i.to_le_bytes()).as_bytes())).collect();
    let err = cluster.worker.find_missing(many).expect_err("65537 digests were looked up");
    assert_status(&err, Code::InvalidArgument, &["65537 digests", "at most 65536"]);
    let grant = cluster.worker.grant();
    let client = cluster.worker.client.clone();
    let hanging = cluster.worker.rt.block_on(async move {
        let mut held = Vec::new();
        let mut answers = Vec::new();
        for i in 0..3u8 {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let data = vec![i; 1000];
            let digest = to_digest(*blake3::hash(&[i; 2000]).as_bytes());
            tx.send(v1::BlobChunk { digest: Some(digest), data, last: false }).await.expect("send");
            let mut client = client.clone();
            let request = granted(tokio_stream::wrappers::ReceiverStream::new(rx), &grant);
            answers.push(tokio::spawn(async move { client.upload_blobs(request).await }));
            held.push(tx);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let third = tokio::time::timeout(Duration::from_secs(10), answers.pop().expect("third")).await;
        drop(held);
        for answer in answers {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer).await;
        }
        third.expect("the third upload was neither refused nor answered").expect("task")
    });
    let err = hanging.expect_err("a third upload of one job was received");
    assert_status(&err, Code::ResourceExhausted, &["already has 2 uploads in progress"]);
    wait_until(Duration::from_secs(10), "the hanging uploads' temp files are removed", || {
        files_in(&cluster.worker_data.join("blobs/tmp")).is_empty()
    });

    // Still serving.
    let fine = *blake3::hash(b"fine").as_bytes();
    assert_eq!(cluster.worker.upload(vec![chunk(to_digest(fine), b"fine", true)]).expect("a good blob"), 1);
    assert_eq!(cluster.worker.find_missing_digests(&[fine, claimed]), [claimed]);
    cluster.assert_clean();
}

// ---- poisoning the shared tier -----------------------------------------------------------------

/// A raw client (any caller the scheduler grants a job) sends the very job an honest client would
/// send for a crate — same arguments, same cargo variables — except that its static library (in
/// the `-L native` directory, where a build script leaves it in `OUT_DIR`) is forged. The worker
/// publishes what it built under the key of what the job read in the sandbox, so the honest
/// client, whose library is the real one, never gets it: its rlib is byte-identical to plain
/// rustc's. Controls: the forged library did shape the attacker's rlib, the attacker's entry was
/// published, and a second honest client does get the worker's result of the first one's job.
#[test]
fn a_job_with_a_forged_input_never_reaches_an_honest_client() {
    let cluster = Cluster::new("");
    let world = &cluster.world;
    let dir = world.path().join("poison");
    let native = dir.join("native");
    fs::create_dir_all(&native).expect("mkdir");
    fs::write(
        dir.join("lib.rs"),
        "extern \"C\" {\n    fn answer() -> i32;\n}\npub fn get() -> i32 {\n    unsafe { answer() }\n}\n",
    )
    .expect("write lib.rs");
    let static_lib = |value: i32| {
        let c = dir.join("answer.c");
        fs::write(&c, format!("int answer(void) {{ return {value}; }}\n")).expect("write answer.c");
        let mut cc = Command::new("cc");
        cc.arg("-c").arg(&c).arg("-o").arg(dir.join("answer.o"));
        ok(run_bounded(cc, Duration::from_secs(60)));
        let _ = fs::remove_file(native.join("libanswer.a"));
        let mut ar = Command::new("ar");
        ar.arg("rcs").arg(native.join("libanswer.a")).arg(dir.join("answer.o"));
        ok(run_bounded(ar, Duration::from_secs(60)));
    };
    let out = dir.join("out");
    let mut args: Vec<String> =
        ["--crate-name", "victim", "--crate-type", "lib", "--edition", "2021"].map(String::from).into();
    args.extend(["--emit=dep-info,metadata,link".into(), "-l".into(), "static=answer".into()]);
    args.extend(["-L".into(), format!("native={}", native.display())]);
    args.extend([path_string(&dir.join("lib.rs")), "--out-dir".into(), path_string(&out)]);
    let cargo_env = [("CARGO_CRATE_NAME", "victim"), ("CARGO_MANIFEST_DIR", utf8(&dir)), ("CARGO_PKG_NAME", "victim")];
    let rlib = out.join("libvictim.rlib");

    // The attack: the forged library goes up with the job; the worker compiles and publishes.
    static_lib(666);
    let job = Job {
        dir: dir.clone(),
        args: args.clone(),
        inputs: vec![dir.join("lib.rs"), native.join("libanswer.a")],
        more_outputs: Vec::new(),
    };
    cluster.upload_inputs(&job);
    let request = v1::RunJobRequest {
        outputs: ["libvictim.rlib", "libvictim.rmeta", "victim.d"].map(|f| path_string(&out.join(f))).into(),
        env: cargo_env.map(|(name, value)| v1::EnvVar { name: name.into(), value: value.into() }).into(),
        ..job.request(cluster.toolchain, &cluster.root)
    };
    let attack = cluster.worker.run_job(request).expect("the attacker's job");
    attack.assert_compiled();
    let forged = attack.outputs[&path_string(&rlib)].clone();
    let entries = || {
        let dir = world.path().join("scheduler/cache");
        if dir.exists() { crate::wrapper::files_under(&dir).len() } else { 0 }
    };
    wait_until(Duration::from_secs(30), "the worker publishes the attacker's result", || entries() >= 2);

    // The honest client: the real library on disk, an empty cache of its own.
    static_lib(1);
    let honest = |name: &str| {
        let (_, stats) = wrapped_rustc(world, name, &dir, &args, &cargo_env);
        (fs::read(&rlib).expect("the honest rlib"), stats)
    };
    let (built, stats) = honest("honest-cache");
    assert_eq!((&stats["hits_remote"], &stats["compiled_remote"]), (&0.into(), &1.into()), "{stats:#}");
    plain_rustc(&dir, &args);
    let expected = fs::read(&rlib).expect("the plain rlib");
    assert!(built == expected, "the honest build differs from plain rustc");
    assert!(forged != expected, "control: the forged library did not change the attacker's rlib");

    // Control: the worker's result of the honest job is served, so the miss above was the keys
    // differing in the library alone.
    wait_until(Duration::from_secs(30), "the honest job's result is published", || entries() >= 4);
    let (again, stats) = honest("second-honest-cache");
    assert_eq!((&stats["hits_remote"], &stats["misses"]), (&1.into(), &0.into()), "{stats:#}");
    assert!(again == expected, "the second honest build differs from plain rustc");
}

/// Runs `rustc args` in `dir` through the wrapper, with its own cache `cache` (under the world)
/// and cargo's variables `env`, after emptying `dir/out`; the wrapper's output and `ferry stats`.
fn wrapped_rustc(world: &World, cache: &str, dir: &Path, args: &[String], env: &[(&str, &str)]) -> (Output, Value) {
    let _ = fs::remove_dir_all(dir.join("out"));
    fs::create_dir_all(dir.join("out")).expect("mkdir");
    let mut cmd = world.command(bin("ferry"));
    cmd.envs(env.iter().copied()).env("FERRY_CACHE_DIR", world.path().join(cache));
    cmd.env("FERRY_LOG_FILE", world.path().join(format!("{cache}.log")));
    cmd.current_dir(dir).arg(sysroot().join("bin/rustc")).args(args);
    let out = run_bounded(cmd, Duration::from_secs(300));
    assert!(out.status.success(), "the wrapped compile failed: {}", text(&out.stderr));
    let mut stats = world.command(bin("ferry"));
    stats.env("FERRY_CACHE_DIR", world.path().join(cache)).args(["stats", "--json"]);
    let stats: Value = serde_json::from_str(&ok(run_bounded(stats, Duration::from_secs(60)))).expect("stats");
    (out, stats)
}

/// Runs plain `rustc args` in `dir`, after emptying `dir/out`.
fn plain_rustc(dir: &Path, args: &[String]) {
    let _ = fs::remove_dir_all(dir.join("out"));
    fs::create_dir_all(dir.join("out")).expect("mkdir");
    let mut plain = Command::new(sysroot().join("bin/rustc"));
    plain.current_dir(dir).args(args);
    ok(run_bounded(plain, Duration::from_secs(120)));
}

// ---- a hostile worker --------------------------------------------------------------------------

/// A worker (anyone holding a `worker` token, or a compromised machine) that registers with the
/// scheduler like a real one and answers every job with what the test tells it to. The client
/// must take nothing it did not ask for: an output outside the declared ones is not written, and
/// an `.rmeta` announced without an observation the client could check never reaches cargo; the
/// compile falls back to a local one, counted.
#[test]
fn a_hostile_worker_gets_nothing_written_outside_the_declared_outputs() {
    let mut world = World::new();
    let scheduler = world.scheduler(&[]);
    world.set("FERRY_SCHEDULER", scheduler.url());
    let log = world.path().join("ferry.log");
    world.set("FERRY_CACHE_DIR", shared_store()).set("FERRY_LOG_FILE", log);
    let uploaded = json(&ferry(&world, &["toolchain", "upload", "--json"]));
    assert_eq!(uploaded["id"], packaged()["id"], "{uploaded}");
    let toolchain = digest_from_hex(packaged()["id"].as_str().expect("id"));
    // Each compile below falls back to a local one: none of them may be a hit on the one before.
    world.set("FERRY_SHARED_CACHE", "off");

    let dir = world.path().join("honest");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join("lib.rs"), "pub fn answer() -> u32 {\n    42\n}\n").expect("write lib.rs");
    let out = dir.join("out");
    let mut args: Vec<String> =
        ["--crate-name", "victim", "--crate-type", "lib", "--edition", "2021"].map(String::from).into();
    args.extend(["--emit=dep-info,metadata,link", "--error-format=json", "--json=artifacts"].map(String::from));
    args.extend([path_string(&dir.join("lib.rs")), "--out-dir".into(), path_string(&out)]);
    let cargo_env = [("CARGO_CRATE_NAME", "victim"), ("CARGO_MANIFEST_DIR", utf8(&dir)), ("CARGO_PKG_NAME", "victim")];
    plain_rustc(&dir, &args);
    let expected: BTreeMap<String, Vec<u8>> =
        files_in(&out).into_iter().map(|f| (f.clone(), fs::read(out.join(&f)).expect("read"))).collect();
    assert_eq!(expected.len(), 3, "{:?}", expected.keys());

    let planted = world.path().join("planted-by-the-worker");
    let rmeta = path_string(&out.join("libvictim.rmeta"));
    let chunk = |path: &str, data: &[u8]| v1::JobEvent {
        kind: Some(job_event::Kind::Output(v1::OutputChunk {
            path: path.to_owned(),
            executable: false,
            data: data.to_vec(),
            last: true,
        })),
    };
    let finished = v1::JobEvent {
        kind: Some(job_event::Kind::Finished(v1::JobFinished { exit_code: Some(0), ..Default::default() })),
    };
    let announced = format!(
        "{{\"$message_type\":\"artifact\",\"artifact\":\"{rmeta}\",\"emit\":\"metadata\",\"from\":\"hostile\"}}\n"
    );
    let answers: Vec<(&str, Vec<v1::JobEvent>)> = vec![
        ("output-rejected", vec![chunk(utf8(&planted), b"planted"), finished.clone()]),
        (
            // Forged outputs at their declared paths, the `.rmeta` announced, no observation sent.
            "remote-observation-incomplete",
            vec![
                chunk(&rmeta, b"forged metadata"),
                v1::JobEvent { kind: Some(job_event::Kind::Stderr(announced.into_bytes())) },
                chunk(&path_string(&out.join("libvictim.rlib")), b"forged rlib"),
                chunk(&path_string(&out.join("victim.d")), b"forged dep-info"),
                finished,
            ],
        ),
    ];
    // The worker serves while the test runs the build: a runtime with a thread of its own.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    for (i, (reason, events)) in answers.into_iter().enumerate() {
        let hostile = rt.block_on(HostileWorker::start(&scheduler.url(), toolchain, events));
        let registered = |s: &Value| s["workers"].as_array().is_some_and(|w| w.len() == 1 && w[0]["id"] == "hostile");
        let status = world.wait_for_status(Duration::from_secs(30), registered);
        assert!(registered(&status), "the hostile worker did not register: {status:#}");
        let (run, stats) = wrapped_rustc(&world, &format!("cache-{i}"), &dir, &args, &cargo_env);
        assert_eq!(stats["fallbacks"], serde_json::json!({ reason: 1 }), "{stats:#}");
        assert_eq!(hostile.jobs(), 1, "the job did not go to the hostile worker");
        assert!(!planted.exists(), "the worker wrote {}", planted.display());
        let got: BTreeMap<String, Vec<u8>> =
            files_in(&out).into_iter().map(|f| (f.clone(), fs::read(out.join(&f)).expect("read"))).collect();
        assert!(got == expected, "{reason}: the outputs differ from plain rustc's");
        // Cargo heard of the `.rmeta` once: from the local compile, not from the worker.
        let stderr = text(&run.stderr);
        assert_eq!(stderr.matches(r#""emit":"metadata""#).count(), 1, "{reason}: {stderr}");
        assert!(!stderr.contains("hostile"), "{reason}: the worker's announcement reached cargo: {stderr}");
        drop(hostile);
        let status = world.wait_for_status(Duration::from_secs(30), |s| workers(s).is_empty());
        assert!(workers(&status).is_empty(), "the hostile worker's session did not end: {status:#}");
    }
}

/// The hostile worker: its gRPC server and its session with the scheduler, both ended on drop.
struct HostileWorker {
    jobs: std::sync::Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl HostileWorker {
    async fn start(scheduler: &str, toolchain: [u8; 32], answer: Vec<v1::JobEvent>) -> HostileWorker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let jobs = std::sync::Arc::new(AtomicU64::new(0));
        let service = Hostile { answer, jobs: jobs.clone() };
        let server = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(v1::worker_server::WorkerServer::new(service))
                .serve_with_incoming(incoming)
                .await;
        });
        let mut client = SchedulerClient::new(connect(scheduler).await.expect("scheduler"));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let register = v1::Register {
            worker_id: "hostile".into(),
            address,
            slots: 4,
            toolchains: vec![to_digest(toolchain)],
            version: "0".into(),
            protocol: ferry_proto::PROTOCOL,
        };
        tx.send(v1::WorkerMessage { kind: Some(v1::worker_message::Kind::Register(register)) }).await.expect("send");
        let mut inbound =
            client.worker_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("session").into_inner();
        let session = tokio::spawn(async move {
            loop {
                let report = v1::Report { toolchains: vec![to_digest(toolchain)], ..Default::default() };
                if tx.send(v1::WorkerMessage { kind: Some(v1::worker_message::Kind::Report(report)) }).await.is_err() {
                    return;
                }
                match tokio::time::timeout(Duration::from_secs(1), inbound.message()).await {
                    Ok(Ok(Some(_))) | Err(_) => {}
                    Ok(_) => return,
                }
            }
        });
        HostileWorker { jobs, tasks: vec![server, session] }
    }

    fn jobs(&self) -> u64 {
        self.jobs.load(Ordering::Relaxed)
    }
}

impl Drop for HostileWorker {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Hostile {
    answer: Vec<v1::JobEvent>,
    jobs: std::sync::Arc<AtomicU64>,
}

#[tonic::async_trait]
impl v1::worker_server::Worker for Hostile {
    async fn find_missing(
        &self,
        _: tonic::Request<v1::FindMissingRequest>,
    ) -> Result<tonic::Response<v1::FindMissingResponse>, Status> {
        Ok(tonic::Response::new(v1::FindMissingResponse { missing: Vec::new() }))
    }

    async fn upload_blobs(
        &self,
        _: tonic::Request<tonic::Streaming<v1::BlobChunk>>,
    ) -> Result<tonic::Response<v1::UploadBlobsResponse>, Status> {
        Ok(tonic::Response::new(v1::UploadBlobsResponse { stored: 0 }))
    }

    type RunJobStream = tokio_stream::Iter<std::vec::IntoIter<Result<v1::JobEvent, Status>>>;

    async fn run_job(
        &self,
        _: tonic::Request<v1::RunJobRequest>,
    ) -> Result<tonic::Response<Self::RunJobStream>, Status> {
        self.jobs.fetch_add(1, Ordering::Relaxed);
        let events: Vec<Result<v1::JobEvent, Status>> = self.answer.iter().cloned().map(Ok).collect();
        Ok(tonic::Response::new(tokio_stream::iter(events)))
    }
}

// ---- helpers: a scheduler and one worker, reached over gRPC ------------------------------------

/// A scheduler with the installed toolchain uploaded (unless made without), one worker `w1`, and a
/// gRPC client to that worker. Daemons are declared first so they die before the world's dir goes.
struct Cluster {
    worker: WorkerApi,
    _worker_daemon: Daemon,
    _scheduler: Daemon,
    toolchain: [u8; 32],
    root: String,
    worker_data: PathBuf,
    world: World,
}

impl Cluster {
    /// With the toolchain uploaded; `worker_toml` is the worker's config file.
    fn new(worker_toml: &str) -> Cluster {
        Cluster::start(worker_toml, true)
    }

    fn without_toolchain() -> Cluster {
        Cluster::start("", false)
    }

    fn start(worker_toml: &str, upload: bool) -> Cluster {
        let mut world = World::new();
        let scheduler = world.scheduler(&[]);
        world.set("FERRY_SCHEDULER", scheduler.url());
        let mut toolchain = [0; 32];
        if upload {
            toolchain = digest_from_hex(packaged()["id"].as_str().expect("id"));
            let log = world.path().join("ferry.log");
            world.set("FERRY_CACHE_DIR", shared_store()).set("FERRY_LOG_FILE", log);
            let uploaded = json(&ferry(&world, &["toolchain", "upload", "--json"]));
            assert_eq!(uploaded["id"], packaged()["id"], "{uploaded}");
        }
        let config = write(&world, "worker.toml", worker_toml);
        let worker = world.worker("w1", &scheduler.url(), &["--config", utf8(&config)]);
        world.wait_for_status(Duration::from_secs(30), |s| !workers(s).is_empty());
        Cluster {
            worker: WorkerApi::connect(&worker.addr, &scheduler.url()),
            _worker_daemon: worker,
            _scheduler: scheduler,
            toolchain,
            root: path_string(sysroot()),
            worker_data: world.path().join("w1"),
            world,
        }
    }

    fn upload_inputs(&self, job: &Job) {
        let blobs: BTreeMap<[u8; 32], PathBuf> =
            job.inputs.iter().map(|p| (*blake3::hash(&fs::read(p).expect("input")).as_bytes(), p.clone())).collect();
        let missing = self.worker.find_missing_digests(&blobs.keys().copied().collect::<Vec<_>>());
        let chunks: Vec<v1::BlobChunk> = missing
            .iter()
            .flat_map(|d| {
                let bytes = fs::read(&blobs[d]).expect("input");
                let pieces: Vec<Vec<u8>> = bytes.chunks(1 << 20).map(<[u8]>::to_vec).collect();
                let count = pieces.len();
                pieces.into_iter().enumerate().map(move |(i, data)| v1::BlobChunk {
                    digest: Some(to_digest(*d)),
                    data,
                    last: i + 1 == count,
                })
            })
            .collect();
        if !chunks.is_empty() {
            assert_eq!(self.worker.upload(chunks).expect("uploading inputs"), missing.len() as u32);
        }
        assert_eq!(
            self.worker.find_missing_digests(&blobs.keys().copied().collect::<Vec<_>>()),
            Vec::<[u8; 32]>::new()
        );
    }

    /// Uploads the job's inputs, runs it and reads its events to the end.
    fn run(&self, job: &Job) -> JobRun {
        self.upload_inputs(job);
        let run = self.worker.run_job(job.request(self.toolchain, &self.root)).expect("RunJob was refused");
        self.assert_clean();
        run
    }

    /// Starts `first` (whose macro prints to stdout, then takes a while), runs `second` to its end
    /// meanwhile (or takes its refusal), then reads `first` to its end; both under the same job id.
    fn run_overlapping(&self, first: &Job, second: &Job) -> (u64, JobRun, Result<JobRun, Status>) {
        self.upload_inputs(first);
        self.upload_inputs(second);
        let (job_id, grant) = self.worker.allocate();
        let requests = [first, second]
            .map(|j| granted(v1::RunJobRequest { job_id, ..j.request(self.toolchain, &self.root) }, &grant));
        let [first, second] = requests;
        let mut client = self.worker.client.clone();
        self.worker
            .rt
            .block_on(bounded(async move {
                let start = Instant::now();
                let mut events = client.run_job(first).await?.into_inner();
                let mut early = JobRun::empty();
                while early.stdout.is_empty() {
                    let Some(event) = events.message().await? else { break };
                    early.add(event);
                }
                let second = match client.run_job(second).await {
                    Ok(events) => Ok(collect(events.into_inner(), Instant::now()).await?),
                    Err(refused) => Err(refused),
                };
                let mut rest = collect(events, start).await?;
                rest.stdout.insert_str(0, &early.stdout);
                rest.stderr.insert_str(0, &early.stderr);
                Ok((job_id, rest, second))
            }))
            .expect("overlapping jobs")
    }

    /// A benign job on the same worker compiles and its rlib comes back.
    fn assert_still_serves(&self) {
        self.run(&Job::benign(&self.world)).assert_compiled();
    }

    /// No job directory and no half-received blob is left on the worker (a job's tree is removed
    /// just after its stream ends).
    fn assert_clean(&self) {
        let jobs = self.worker_data.join("jobs");
        wait_until(Duration::from_secs(10), "the worker removes the job directories", || files_in(&jobs).is_empty());
        assert_eq!(files_in(&self.worker_data.join("blobs/tmp")), Vec::<String>::new(), "a blob temp file was left");
    }
}

/// A gRPC client to a worker, with its own runtime so the tests stay synchronous. Like a real
/// client it asks the scheduler for job grants: one kept for blob calls, a fresh one per job.
struct WorkerApi {
    rt: tokio::runtime::Runtime,
    client: WorkerClient<Channel>,
    scheduler: SchedulerClient<Channel>,
    blob_grant: std::cell::RefCell<Option<(Instant, Vec<u8>)>>,
}

impl WorkerApi {
    fn connect(addr: &str, scheduler: &str) -> WorkerApi {
        let rt = runtime();
        let channel = rt.block_on(connect(&format!("http://{addr}"))).expect("connecting to the worker");
        let scheduler = rt.block_on(connect(scheduler)).expect("connecting to the scheduler");
        WorkerApi {
            rt,
            client: WorkerClient::new(channel),
            scheduler: SchedulerClient::new(scheduler),
            blob_grant: std::cell::RefCell::new(None),
        }
    }

    /// A fresh allocation: (job id, grant).
    fn allocate(&self) -> (u64, Vec<u8>) {
        let a = self.rt.block_on(allocate_as(self.scheduler.clone()));
        (a.job_id, a.grant)
    }

    /// The grant blob calls use (renewed well before it expires).
    fn grant(&self) -> Vec<u8> {
        let mut held = self.blob_grant.borrow_mut();
        if held.as_ref().is_none_or(|(at, _)| at.elapsed() > Duration::from_secs(60)) {
            *held = Some((Instant::now(), self.allocate().1));
        }
        held.as_ref().expect("just set").1.clone()
    }

    fn find_missing(&self, digests: Vec<v1::Digest>) -> Result<Vec<v1::Digest>, Status> {
        let mut client = self.client.clone();
        let request = granted(v1::FindMissingRequest { digests }, &self.grant());
        self.rt.block_on(bounded(async move { Ok(client.find_missing(request).await?.into_inner().missing) }))
    }

    fn find_missing_digests(&self, digests: &[[u8; 32]]) -> Vec<[u8; 32]> {
        let missing = self.find_missing(digests.iter().map(|d| to_digest(*d)).collect()).expect("FindMissing");
        missing.iter().map(|d| d.blake3.as_slice().try_into().expect("32 bytes")).collect()
    }

    fn upload(&self, chunks: Vec<v1::BlobChunk>) -> Result<u32, Status> {
        let mut client = self.client.clone();
        let request = granted(tokio_stream::iter(chunks), &self.grant());
        self.rt.block_on(bounded(async move { Ok(client.upload_blobs(request).await?.into_inner().stored) }))
    }

    /// Runs `request` as the job of a fresh grant (its job id is the grant's).
    fn run_job(&self, request: v1::RunJobRequest) -> Result<JobRun, Status> {
        let (job_id, grant) = self.allocate();
        self.run_job_granted(v1::RunJobRequest { job_id, ..request }, &grant)
    }

    fn run_job_granted(&self, request: v1::RunJobRequest, grant: &[u8]) -> Result<JobRun, Status> {
        let mut client = self.client.clone();
        let request = granted(request, grant);
        self.rt.block_on(bounded(async move {
            let start = Instant::now();
            collect(client.run_job(request).await?.into_inner(), start).await
        }))
    }
}

/// A request carrying a job grant.
fn granted<T>(message: T, grant: &[u8]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    ferry_proto::attach_grant(&mut request, grant);
    request
}

/// `Allocate` until the scheduler assigns a worker (it answers "compile locally" while its
/// workers fetch a just-uploaded toolchain); bounded.
async fn allocate_as(mut scheduler: SchedulerClient<Channel>) -> v1::Assignment {
    let start = Instant::now();
    loop {
        let request =
            v1::AllocateRequest { toolchain: Some(to_digest([9; 32])), client_id: "test".into(), protocol: 0 };
        let answer = scheduler.allocate(request).await.expect("Allocate").into_inner();
        if let Some(v1::allocate_response::Result::Assigned(a)) = answer.result {
            return a;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no assignment within 60 s: {answer:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What one job sent back, from its event stream read to the end.
struct JobRun {
    stdout: String,
    stderr: String,
    /// Output files by path, reassembled from their chunks.
    outputs: BTreeMap<String, Vec<u8>>,
    finished: Option<v1::JobFinished>,
    /// What the worker observed, as it said at the end (`complete`).
    observed: Option<v1::Observed>,
    elapsed: Duration,
}

/// Outputs as their sizes: the bytes themselves would drown the diagnostics.
impl std::fmt::Debug for JobRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: BTreeMap<&String, usize> = self.outputs.iter().map(|(p, b)| (p, b.len())).collect();
        f.debug_struct("JobRun")
            .field("finished", &self.finished)
            .field("elapsed", &self.elapsed)
            .field("output_sizes", &sizes)
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr)
            .finish()
    }
}

impl JobRun {
    fn empty() -> JobRun {
        JobRun {
            stdout: String::new(),
            stderr: String::new(),
            outputs: BTreeMap::new(),
            finished: None,
            observed: None,
            elapsed: Duration::ZERO,
        }
    }

    fn add(&mut self, event: v1::JobEvent) {
        match event.kind {
            Some(job_event::Kind::Stdout(b)) => self.stdout.push_str(&String::from_utf8_lossy(&b)),
            Some(job_event::Kind::Stderr(b)) => self.stderr.push_str(&String::from_utf8_lossy(&b)),
            Some(job_event::Kind::Output(o)) => self.outputs.entry(o.path).or_default().extend_from_slice(&o.data),
            Some(job_event::Kind::Finished(f)) => self.finished = Some(f),
            Some(job_event::Kind::Observed(o)) if o.complete => self.observed = Some(o),
            Some(job_event::Kind::Observed(_)) | None => {}
        }
    }

    fn finished(&self) -> &v1::JobFinished {
        self.finished.as_ref().unwrap_or_else(|| panic!("the job never said it finished: {self:#?}"))
    }

    /// rustc exited 0 and the rlib came back.
    fn assert_compiled(&self) {
        let f = self.finished();
        assert_eq!((f.exit_code, f.limit.as_str()), (Some(0), ""), "{self:#?}");
        let rlib = self.outputs.iter().find(|(p, _)| p.ends_with("/out/libvictim.rlib"));
        assert!(rlib.is_some_and(|(_, bytes)| bytes.starts_with(b"!<arch>\n")), "no rlib came back: {self:#?}");
    }

    /// The macro ran, met `needle` (an error it panicked with) and the compile failed, no limit hit.
    fn assert_macro_failed(&self, needle: &str) {
        let f = self.finished();
        assert!(f.exit_code.is_some_and(|c| c != 0), "the compile did not fail: {self:#?}");
        assert_eq!(f.limit, "", "{self:#?}");
        assert!(self.stderr.contains("proc macro panicked"), "the macro did not run: {self:#?}");
        assert!(self.stderr.contains(needle), "stderr lacks {needle:?}: {self:#?}");
        assert!(self.outputs.is_empty(), "a failed job sent outputs: {self:#?}");
    }

    fn assert_limit(&self, limit: &str) {
        let f = self.finished();
        assert_ne!(f.exit_code, Some(0), "{self:#?}");
        assert_eq!(f.limit, limit, "{self:#?}");
        assert!(self.outputs.is_empty(), "a stopped job sent outputs: {self:#?}");
    }
}

async fn collect(mut events: tonic::Streaming<v1::JobEvent>, start: Instant) -> Result<JobRun, Status> {
    let mut run = JobRun::empty();
    while let Some(event) = events.message().await? {
        run.add(event);
    }
    run.elapsed = start.elapsed();
    Ok(run)
}

/// One compile of crate `victim` from `<world>/job-<name>/lib.rs`, maybe with a proc-macro `evil`
/// built here from an attack, everything at absolute paths in the world (as a client sends them).
struct Job {
    dir: PathBuf,
    args: Vec<String>,
    inputs: Vec<PathBuf>,
    /// Declared outputs besides `out/libvictim.rlib`.
    more_outputs: Vec<PathBuf>,
}

impl Job {
    const BENIGN: &'static str = "pub fn answer() -> u32 { 42 }\n";

    /// blake3 of [`Job::BENIGN`], the blob every benign job uploads.
    fn benign_digest() -> [u8; 32] {
        *blake3::hash(Job::BENIGN.as_bytes()).as_bytes()
    }

    fn benign(world: &World) -> Job {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let dir = world.path().join(format!("benign-{}", COUNT.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("lib.rs"), Job::BENIGN).expect("write lib.rs");
        Job::new(dir, false)
    }

    /// `body` is the macro's body: Rust returning a `proc_macro::TokenStream`.
    fn attack(world: &World, name: &str, body: &str) -> Job {
        let dir = world.path().join(format!("job-{name}"));
        fs::create_dir_all(&dir).expect("mkdir");
        let source = format!(
            "extern crate proc_macro;\n#[proc_macro]\n\
             pub fn evil(_: proc_macro::TokenStream) -> proc_macro::TokenStream {{\n{body}\n}}\n"
        );
        let src = world.path().join(format!("evil-{name}.rs"));
        fs::write(&src, source).expect("write macro");
        let mut rustc = Command::new(sysroot().join("bin/rustc"));
        rustc.args(["--crate-type", "proc-macro", "--edition", "2021", "--crate-name", "evil"]);
        rustc.arg(&src).arg("-o").arg(dir.join("libevil.so"));
        ok(run_bounded(rustc, Duration::from_secs(120)));
        fs::write(dir.join("lib.rs"), "evil::evil!();\n").expect("write lib.rs");
        Job::new(dir, true)
    }

    fn new(dir: PathBuf, with_macro: bool) -> Job {
        let mut args: Vec<String> =
            ["--crate-name", "victim", "--crate-type", "lib", "--edition", "2021"].map(String::from).into();
        let mut inputs = vec![dir.join("lib.rs")];
        if with_macro {
            args.extend(["--extern".to_owned(), format!("evil={}", dir.join("libevil.so").display())]);
            inputs.push(dir.join("libevil.so"));
        }
        args.extend([path_string(&dir.join("lib.rs")), "--out-dir".into(), path_string(&dir.join("out"))]);
        Job { dir, args, inputs, more_outputs: Vec::new() }
    }

    /// The RunJob request a client would send for this compile.
    fn request(&self, toolchain: [u8; 32], root: &str) -> v1::RunJobRequest {
        static JOB_IDS: AtomicU64 = AtomicU64::new(1000);
        v1::RunJobRequest {
            job_id: JOB_IDS.fetch_add(1, Ordering::Relaxed),
            toolchain: Some(to_digest(toolchain)),
            toolchain_root: root.to_owned(),
            program: format!("{root}/bin/rustc"),
            args: self.args.clone(),
            cwd: path_string(&self.dir),
            env: Vec::new(),
            inputs: self
                .inputs
                .iter()
                .map(|p| v1::InputFile {
                    path: path_string(p),
                    digest: Some(to_digest(*blake3::hash(&fs::read(p).expect("input")).as_bytes())),
                    executable: std::os::unix::fs::PermissionsExt::mode(&fs::metadata(p).expect("input").permissions())
                        & 0o111
                        != 0,
                })
                .collect(),
            outputs: [self.dir.join("out/libvictim.rlib")]
                .iter()
                .chain(&self.more_outputs)
                .map(|p| path_string(p))
                .collect(),
            dirs: vec![path_string(&self.dir.join("out"))],
            basedirs: Vec::new(),
        }
    }

    /// The control: the same compile with plain rustc on the host, outside any sandbox.
    fn run_on_host(&self) -> Output {
        fs::create_dir_all(self.dir.join("host-out")).expect("mkdir");
        let mut args = self.args.clone();
        *args.last_mut().expect("out dir") = path_string(&self.dir.join("host-out"));
        let mut rustc = Command::new(sysroot().join("bin/rustc"));
        rustc.args(&args).current_dir(&self.dir);
        run_bounded(rustc, Duration::from_secs(120))
    }
}

/// A gRPC client to the scheduler (no token: the loopback default).
struct SchedulerApi {
    rt: tokio::runtime::Runtime,
    client: SchedulerClient<Channel>,
}

impl SchedulerApi {
    fn connect(scheduler: &Daemon) -> SchedulerApi {
        let rt = runtime();
        let channel = rt.block_on(connect(&scheduler.url())).expect("connecting to the scheduler");
        SchedulerApi { rt, client: SchedulerClient::new(channel) }
    }

    fn has(&self, id: [u8; 32]) -> bool {
        let mut client = self.client.clone();
        let request = v1::ToolchainRef { id: Some(to_digest(id)) };
        self.rt
            .block_on(bounded(async move { Ok(client.has_toolchain(request).await?.into_inner().present) }))
            .expect("HasToolchain")
    }

    /// `UploadToolchain`: a header claiming `id` and `size`, then the archive's bytes (only the
    /// first `send` bytes when given) in 1 MiB chunks. Returns whether it was stored.
    fn upload(&self, id: [u8; 32], size: u64, archive: &Path, send: Option<u64>) -> Result<bool, Status> {
        let header =
            v1::ToolchainHeader { id: Some(to_digest(id)), size, rustc_version: "test".into(), targets: vec![] };
        let mut file = fs::File::open(archive).expect("open archive").take(send.unwrap_or(u64::MAX));
        let data = std::iter::from_fn(move || {
            let mut buf = Vec::with_capacity(1 << 20);
            (&mut file).take(1 << 20).read_to_end(&mut buf).expect("read archive");
            (!buf.is_empty()).then_some(v1::ToolchainUpload { kind: Some(toolchain_upload::Kind::Data(buf)) })
        });
        let messages =
            std::iter::once(v1::ToolchainUpload { kind: Some(toolchain_upload::Kind::Header(header)) }).chain(data);
        let mut client = self.client.clone();
        self.rt.block_on(bounded(async move {
            Ok(client.upload_toolchain(tokio_stream::iter(messages)).await?.into_inner().stored)
        }))
    }
}

/// `FindMissing` on the worker at `url` as a caller trusting `ca`, holding `token` (a bearer token,
/// which workers ignore) and `grant`.
async fn find_missing_as(
    url: &str,
    ca: Option<&Path>,
    token: Option<&str>,
    grant: Option<&[u8]>,
    digests: Vec<[u8; 32]>,
) -> Result<Vec<[u8; 32]>, Status> {
    let channel = connect_trusting(url, ca).await?;
    let mut request =
        tonic::Request::new(v1::FindMissingRequest { digests: digests.into_iter().map(to_digest).collect() });
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", bearer(token).parse().expect("header value"));
    }
    if let Some(grant) = grant {
        ferry_proto::attach_grant(&mut request, grant);
    }
    let missing = WorkerClient::new(channel).find_missing(request).await?.into_inner().missing;
    Ok(missing.iter().map(|d| d.blake3.as_slice().try_into().expect("32 bytes")).collect())
}

async fn connect(url: &str) -> Result<Channel, Status> {
    connect_trusting(url, None).await
}

/// A channel to `url`; for `https://`, trusting only `ca` (when given). A failure is an
/// `Unavailable` status carrying the whole error chain (where TLS says what it disliked).
async fn connect_trusting(url: &str, ca: Option<&Path>) -> Result<Channel, Status> {
    let mut endpoint = Endpoint::from_shared(url.to_owned()).expect("url").connect_timeout(Duration::from_secs(5));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = ca {
            tls = tls.ca_certificate(Certificate::from_pem(fs::read(ca).expect("read CA")));
        }
        endpoint = endpoint.tls_config(tls).expect("TLS config");
    }
    endpoint.connect().await.map_err(|e| {
        let mut chain = format!("connecting to {url}: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            chain.push_str(&format!(": {s}"));
            source = s.source();
        }
        Status::unavailable(chain)
    })
}

/// Every gRPC exchange here is bounded: a hang is a failure, not a stuck test.
async fn bounded<T>(f: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(Duration::from_secs(120), f).await.unwrap_or_else(|_| panic!("no answer within 120 s"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

fn assert_status(status: &Status, code: Code, needles: &[&str]) {
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(status.message().contains(needle), "{:?} lacks {needle:?}", status.message());
    }
}

// ---- helpers: the toolchain, packaged once ----------------------------------------------------

/// `ferry toolchain package --json` of the installed toolchain into [`shared_store`]: the archive
/// costs seconds to build, so it is built once and kept between runs (the store heals itself).
fn packaged() -> &'static Value {
    static PACKAGED: OnceLock<Value> = OnceLock::new();
    PACKAGED.get_or_init(|| {
        let mut world = World::new();
        let log = world.path().join("ferry.log");
        world.set("FERRY_CACHE_DIR", shared_store()).set("FERRY_LOG_FILE", log);
        json(&ferry(&world, &["toolchain", "package", "--json"]))
    })
}

/// The installed toolchain's canonical root: where clients have it, so where jobs see it.
fn sysroot() -> &'static Path {
    static SYSROOT: OnceLock<PathBuf> = OnceLock::new();
    SYSROOT.get_or_init(|| fs::canonicalize(installed_sysroot()).expect("canonical sysroot"))
}

fn shared_store() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("ferry-security-store")
}

/// The scheduler's toolchain store holds no archive and no record, and no temp file.
fn assert_store_empty(store: &Path) {
    let left: Vec<String> =
        files_in(store).into_iter().filter(|f| f.ends_with(".tar.gz") || f.ends_with(".json")).collect();
    assert_eq!(left, Vec::<String>::new(), "a refused upload left files in {}", store.display());
    assert_eq!(files_in(&store.join("tmp")), Vec::<String>::new(), "a refused upload left a temp file");
}

// ---- helpers: exposure -------------------------------------------------------------------------

/// Runs `<daemon> --listen 0.0.0.0:0` (with `--config` when given), expecting it to refuse.
fn serve_at_any_address(world: &World, daemon: &str, config: Option<&Path>) -> Output {
    let mut cmd = world.command(bin(daemon));
    cmd.args(["--listen", "0.0.0.0:0", "--data-dir"]).arg(world.path().join(format!("{daemon}-data")));
    if daemon == "ferry-worker" {
        cmd.args(["--scheduler", "http://127.0.0.1:9"]);
    }
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    run_bounded(cmd, Duration::from_secs(30))
}

/// Exited non-zero, saying what would make it serve, and never announced an address.
fn assert_exposure_refused(out: &Output) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "it served on 0.0.0.0 without TLS and tokens:\n{stderr}");
    for needle in ["refusing to listen on 0.0.0.0", "TLS", "tokens", "insecure = true"] {
        assert!(stderr.contains(needle), "the refusal lacks {needle:?}:\n{stderr}");
    }
    assert!(
        !text(&out.stdout).contains("listening on"),
        "it announced an address it refuses to serve:\n{}",
        text(&out.stdout)
    );
}

// ---- helpers: processes, files, output ---------------------------------------------------------

/// Runs a command to its end, killing it (and failing) if it takes longer than `limit`.
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            // SAFETY: plain system call; the child is not reaped yet, so the pid is still ours.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("{cmd:?} still running after {limit:?}");
        }
    }
}

fn ferry(world: &World, args: &[&str]) -> Output {
    let mut cmd = world.command(bin("ferry"));
    cmd.args(args);
    run_bounded(cmd, Duration::from_secs(120))
}

fn json(out: &Output) -> Value {
    let stdout = ok(out.clone());
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{stdout}"))
}

fn status(world: &World) -> Value {
    json(&ferry(world, &["status", "--json"]))
}

/// Addresses of the registered workers in a `ferry status --json`.
fn workers(status: &Value) -> Vec<String> {
    let list = status["workers"].as_array().unwrap_or_else(|| panic!("no workers list: {status}"));
    list.iter().map(|w| w["address"].as_str().expect("address").to_owned()).collect()
}

/// `ferry` failed with one clear line on stderr containing every needle, and printed nothing.
fn assert_refused(out: &Output, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "it worked:\n{}", text(&out.stdout));
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line:\n{stderr}");
    assert!(stderr.starts_with("ferry: error: "), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "the error lacks {needle:?}: {stderr}");
    }
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

/// Runs `f` with `FERRY_TOKEN` out of the world's environment (a daemon must use its config file).
fn without_token<T>(world: &mut World, f: impl FnOnce(&World) -> T) -> T {
    let saved = world.env.iter().find(|(k, _)| k == "FERRY_TOKEN").cloned();
    unset(world, "FERRY_TOKEN");
    let result = f(world);
    if let Some((k, v)) = saved {
        world.set(&k, v);
    }
    result
}

fn unset(world: &mut World, key: &str) {
    world.env.retain(|(k, _)| k != key);
}

fn tokens_toml(tokens: &[(&str, &str)]) -> String {
    tokens.iter().map(|(token, role)| format!("[[tokens]]\ntoken = \"{token}\"\nroles = [\"{role}\"]\n")).collect()
}

fn wait_until(limit: Duration, what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fails unless, within a few seconds, no process has all of `needles` in its command line.
fn assert_no_processes_with(needles: &[&str]) {
    let find = || -> Vec<String> {
        let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| needles.iter().all(|n| c.contains(n)))
            .collect()
    };
    let start = Instant::now();
    while !find().is_empty() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(find(), Vec::<String>::new(), "processes left behind");
}

fn write(world: &World, name: &str, content: &str) -> PathBuf {
    let path = world.path().join(name);
    fs::write(&path, content).expect("write");
    path
}

/// Names in `dir` (none when it does not exist), except a `tmp` directory, which callers list
/// on its own.
fn files_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n != "tmp").collect()
}

fn digest_from_hex(s: &str) -> [u8; 32] {
    *blake3::Hash::from_hex(s).unwrap_or_else(|e| panic!("{s}: {e}")).as_bytes()
}

fn hex(d: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*d).to_hex().to_string()
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn path_string(path: &Path) -> String {
    utf8(path).to_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The port of `host:port`.
fn port_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(_, port)| port)
}
