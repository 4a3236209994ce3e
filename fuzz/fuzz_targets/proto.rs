//! Messages from the network, decoded and converted as the daemons and the wrapper do: a job
//! request, job events, a job grant.
#![no_main]

use ferry_proto::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = v1::RunJobRequest::decode(data) {
        let _ = ferry_proto::digest(r.toolchain.as_ref(), "toolchain");
        for input in &r.inputs {
            let _ = ferry_proto::absolute_path(&input.path, "inputs.path");
            let _ = ferry_proto::digest(input.digest.as_ref(), "inputs.digest");
        }
    }
    let _ = v1::JobEvent::decode(data);
    let _ = v1::WorkerMessage::decode(data);
    let _ = v1::AllocateResponse::decode(data);
    let _ = ferry_proto::Grant::verify(data, &[[3; 32]], "worker", 0);
});
