//! The cost of zero trust on the hot paths, in this process (release build): checking an entry's
//! writer signature on a shared-tier hit (against the checksum check every hit does anyway, and
//! against the symmetric MAC seal it replaced: a keyed blake3 of the entry), and signing and
//! checking a job grant (once per allocation and once per worker call).

use std::time::Instant;

use ferry_cache::{CacheKey, CompileOutput, Entry, OutputFile};
use ferry_proto::{Grant, new_grant_key};

pub fn costs() -> anyhow::Result<()> {
    println!("== authentication costs (one core, release build)");
    let key = *blake3::hash(b"site key").as_bytes();
    for (label, size) in [("16 KiB", 16 << 10), ("1 MiB", 1 << 20), ("19 MiB (a large rlib)", 19 << 20)] {
        let mut content = vec![0u8; size];
        blake3::Hasher::new().update(b"bench").finalize_xof().fill(&mut content);
        let cache_key = CacheKey(*blake3::hash(label.as_bytes()).as_bytes());
        let output = CompileOutput {
            files: vec![OutputFile { path: "/x.rlib".into(), executable: false, bytes: content.into() }],
            ..Default::default()
        };
        let entry = Entry::encode_result(cache_key, [1; 32], &output);
        let (writer, _) = ferry_cache::Signer::generate().map_err(anyhow::Error::msg)?;
        let trust = ferry_cache::Trust { trusted: [writer.public()].into(), revoked: Default::default() };
        let signed = ferry_cache::sign(&entry, &writer);
        let rounds = (256 << 20) / size.max(1 << 16);
        let per = |f: &dyn Fn()| {
            f();
            let start = Instant::now();
            for _ in 0..rounds {
                f();
            }
            start.elapsed().as_secs_f64() * 1e6 / rounds as f64
        };
        let signature_us = per(&|| {
            ferry_cache::verify(&signed, &trust).expect("verifies");
        });
        let mac_us = per(&|| {
            std::hint::black_box(blake3::keyed_hash(&key, &entry));
        });
        let check_us = per(&|| Entry::check(&entry, &cache_key).expect("checks"));
        println!(
            "  entry of {label}: signature check {signature_us:.1} µs per hit ({:.2}x the MAC seal check it replaced, \
             {mac_us:.1} µs); the checksum check every hit makes {check_us:.1} µs",
            signature_us / mac_us
        );
    }
    let grant_key = new_grant_key();
    let rounds = 200_000;
    let start = Instant::now();
    let mut last = Vec::new();
    for job in 0..rounds {
        last = Grant::new(job, "worker-a").sign(&grant_key);
    }
    let sign_ns = start.elapsed().as_secs_f64() * 1e9 / rounds as f64;
    let keys = [grant_key];
    let start = Instant::now();
    for _ in 0..rounds {
        Grant::verify(&last, &keys, "worker-a", 0).expect("verifies");
    }
    let verify_ns = start.elapsed().as_secs_f64() * 1e9 / rounds as f64;
    println!(
        "  job grant: signed by the scheduler in {:.2} µs per allocation, checked by the worker in {:.2} µs per call",
        sign_ns / 1000.0,
        verify_ns / 1000.0
    );
    Ok(())
}
