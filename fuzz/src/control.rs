//! Control messages (xenbus/src/message.rs, protocol.rs, netif.rs,
//! virtio.rs): the codec, then every typed view a supervisor or backend
//! parses, each checked to round-trip (what a view accepts, it writes back
//! to a message that parses to the same view).

use arbitrary::{Result, Unstructured};
use shadowback_xenbus::netif::{NetAttachRequest, NetBackendInfo, NetConnectRequest};
use shadowback_xenbus::virtio::VirtioAttachRequest;
use shadowback_xenbus::{key, kind, AttachRequest, BackendInfo, ConnectRequest, Message};

const KINDS: &[&str] = &[
    kind::CONNECT,
    kind::ATTACH,
    kind::ATTACH_VIRTIO,
    shadowback_xenbus::netif::ATTACH_NET,
    kind::BACKEND,
    kind::CONNECTED,
    kind::PROBE,
    kind::STATUS,
    kind::FAULT,
    kind::ERROR,
];

const KEYS: &[&str] = &[
    key::DEVICE,
    key::STATE,
    key::BACKEND_ID,
    key::FRONTEND_ID,
    key::FRONTEND,
    key::SECTORS,
    key::SECTOR_SIZE,
    key::PHYSICAL_SECTOR_SIZE,
    key::MODE,
    key::FEATURE_FLUSH_CACHE,
    key::FEATURE_DISCARD,
    key::DISCARD_GRANULARITY,
    key::DISCARD_ALIGNMENT,
    key::FEATURE_MAX_INDIRECT_SEGMENTS,
    key::MAX_RING_PAGE_ORDER,
    key::INFO,
    key::RING_PAGE_ORDER,
    key::RING_REF,
    "ring-ref0",
    "ring-ref1",
    "ring-ref2",
    "ring-ref3",
    key::GRANT_FRAMES,
    key::PROTOCOL,
    key::FEATURE_PERSISTENT,
    key::CODE,
    key::FEATURES,
    key::REGIONS,
    key::QUEUES,
    key::INFLIGHT,
    key::SHADOW,
    "region-0",
    "region-1",
    "queue-0",
    "queue-1",
    key::SECTOR,
    key::ACTION,
    "mac",
    "mtu",
    "tx-ring-ref",
    "rx-ring-ref",
    "request-rx-copy",
    "feature-rx-notify",
    "feature-sg",
    "feature-gso-tcpv4",
    "feature-gso-tcpv6",
    "split-event-channels",
    "feature-no-csum-offload",
    "multi-queue-num-queues",
];

const VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "4",
    "16",
    "0008",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
    "",
    "x86_64-abi",
    "x86_32-abi",
    "w",
    "r",
    "00:16:3e:00:00:01",
    "ff:ff:ff:ff:ff:ff",
    "0,1000,0",
    "0,100000,0",
    "ffffffffffffffff,1000,0",
    "0,100,0,1000,2000,0",
    "0,8000,0,1000,2000,0",
    "1000,0,100",
    "100000000",
    "vd0",
];

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let bytes = match structured(&mut u) {
        Ok(Some(b)) => b,
        _ => data.to_vec(),
    };
    check(&bytes);
}

/// A message built from known kinds, keys and values (or `None`: use the
/// input as raw bytes).
fn structured(u: &mut Unstructured) -> Result<Option<Vec<u8>>> {
    if u.ratio(1, 4)? {
        return Ok(None);
    }
    let mut text = String::from(*u.choose(KINDS)?);
    text.push('\n');
    for _ in 0..u.int_in_range(0..=40)? {
        if u.ratio(1, 16)? {
            let raw: String = u.arbitrary()?;
            text.push_str(&raw);
        } else {
            text.push_str(u.choose(KEYS)?);
            text.push('=');
            if u.ratio(1, 8)? {
                let n: u64 = u.arbitrary()?;
                text.push_str(&n.to_string());
            } else if u.ratio(1, 8)? {
                // Long values: messages near the size limit.
                let len = u.int_in_range(0..=300)?;
                text.extend(std::iter::repeat_n('v', len));
            } else {
                text.push_str(u.choose(VALUES)?);
            }
        }
        text.push('\n');
    }
    // The final newline is optional on the wire.
    if u.arbitrary()? {
        text.pop();
    }
    Ok(Some(text.into_bytes()))
}

fn check(bytes: &[u8]) {
    let Ok(msg) = Message::decode(bytes) else {
        return;
    };
    // Whatever decodes re-encodes, to the same message.
    let encoded = msg.encode().expect("a decoded message encodes");
    assert_eq!(Message::decode(&encoded).ok().as_ref(), Some(&msg));
    let _ = msg.state();
    let _ = msg
        .get(key::CODE)
        .map(str::parse::<shadowback_xenbus::ErrorCode>);
    if let Ok(c) = ConnectRequest::from_message(&msg) {
        let again = c.to_message().expect("a parsed connect writes back");
        assert_eq!(ConnectRequest::from_message(&again).ok(), Some(c));
    }
    if let Ok(a) = AttachRequest::from_message(&msg) {
        let again = a.to_message().expect("a parsed attach writes back");
        assert_eq!(AttachRequest::from_message(&again).ok(), Some(a));
    }
    let _ = BackendInfo::from_message(&msg);
    if let Ok(v) = VirtioAttachRequest::from_message(&msg) {
        assert_eq!(
            VirtioAttachRequest::from_message(&v.to_message()).ok(),
            Some(v)
        );
    }
    if let Ok(n) = NetConnectRequest::from_message(&msg) {
        assert_eq!(
            NetConnectRequest::from_message(&n.to_message()).ok(),
            Some(n)
        );
    }
    if let Ok(n) = NetAttachRequest::from_message(&msg) {
        assert_eq!(
            NetAttachRequest::from_message(&n.to_message()).ok(),
            Some(n)
        );
    }
    let _ = NetBackendInfo::from_message(&msg);
}
