//! Pinned wire bytes: a fixed key and fixed inputs give exactly these frames, so the format
//! (and `SPEC.md`, which walks through the same bytes) cannot drift unnoticed.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;
use caas_protocol::*;
use common::*;

#[test]
fn typical_command_frame_is_pinned() {
    let frame = seal_cmd(&typical_command(), &gateway_key());
    println!("{}", hex::encode(&frame));
    assert_eq!(hex::encode(&frame), PINNED_COMMAND);
    assert_eq!(
        open_command(&frame, &trusted_gateway()).unwrap(),
        typical_command()
    );
}

#[test]
fn typical_report_frame_is_pinned() {
    let frame = seal_rpt(&typical_report(), &car_key());
    println!("{}", hex::encode(&frame));
    assert_eq!(hex::encode(&frame), PINNED_REPORT);
    let car = TrustedKey::new(car_key().verifying_key());
    assert_eq!(open_report(&frame, &car).unwrap(), typical_report());
}

#[test]
fn query_frame_is_pinned() {
    let cmd = Command {
        vin: vin(),
        seq: 7,
        issued_at: ISSUED_AT,
        not_after: ISSUED_AT + 60,
        body: CommandBody::QueryStatus { nonce: 0xC0FFEE },
    };
    let frame = seal_cmd(&cmd, &gateway_key());
    println!("{}", hex::encode(&frame));
    assert_eq!(hex::encode(&frame), PINNED_QUERY);
}

#[test]
fn key_ids_are_pinned() {
    assert_eq!(
        KeyId::of(&gateway_key().verifying_key()).to_string(),
        PINNED_GATEWAY_KEY_ID
    );
    assert_eq!(
        verifying_key_to_hex(&gateway_key().verifying_key()).as_str(),
        PINNED_GATEWAY_PUBLIC
    );
}

const PINNED_COMMAND: &str = "636161732d636d640168bc317183d12ed37d00115756575a5a5a314a5a585730303030303107c08df6d706c0b0fbd706000111111111111111111111111111111111020b706f7765722d626f6f7374010b706f7765725f626f6f7374010c626f6f737450657263656e7402313501c0829bd8060c6865617465642d7365617473010c6865617465645f7365617473000099345ec00eec5f1919da2da0887cd77e573a75e6295bbc3b2b7067f864d0f44c50568b551e04779ec9eef5d450afb752621a67caacab607d18e257f3f66b8c07";
const PINNED_REPORT: &str = "636161732d7270740140bf7e7b7045ed204c00115756575a5a5a314a5a585730303030303107c38df6d7060007020b706f7765722d626f6f737401c0829bd8060c6865617465642d73656174730005322e342e31010854504d535f4c4f57573eb7a5e8298dcabb4bc2e89c4e1278bc96b61d9d06a02316b012a3a0894db2ad467be088b3e34d92563482337d569ef7a873977b246b4380a8876fcb4a2d520f";
const PINNED_QUERY: &str = "636161732d636d640168bc317183d12ed32200115756575a5a5a314a5a585730303030303107c08df6d706fc8df6d70601eeff83063ab38343ebf6ecc5f98909634748b6392810aeaac8f4c3092effa92f8cd8be88f02cdf4948c469c9654612faf0d75707c68dd1bd0352ce231c7f1b21fb3e0902";
const PINNED_GATEWAY_KEY_ID: &str = "68bc317183d12ed3";
const PINNED_GATEWAY_PUBLIC: &str =
    "2152f8d19b791d24453242e15f2eab6cb7cffa7b6a5ed30097960e069881db12";

#[test]
fn stated_bounds_match_spec() {
    // SPEC.md quotes these numbers; change both together.
    assert_eq!(MAX_GRANT_SIZE, 378);
    assert_eq!(MAX_COMMAND_SIZE, 3203);
    assert_eq!(MAX_COMMAND_FRAME_SIZE, 3286);
    assert_eq!(MAX_REPORT_SIZE, 499);
    assert_eq!(MAX_REPORT_FRAME_SIZE, 582);
    assert_eq!(MAX_FRAME_SIZE, 3286);
}
