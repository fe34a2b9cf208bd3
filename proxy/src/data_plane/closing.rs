//! Every close sequence the proxy runs, on every data plane: what each side is sent and how
//! long it gets to answer. The planes differ only in how bytes reach a socket (a userspace
//! write, or after the kernel's redirected bytes are out); what is sent, and when the
//! connection counts as ended, is decided here.

use std::time::Duration;

use proxy_common::policy::{
    self, Ending, proxy_close_code, proxy_close_code_to_function, proxy_close_reason,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::warn;

use crate::{
    clock::monotonic_ns,
    protocols::frames::{FrameError, close_frame, masked_close_frame},
};

/// After the proxy sent a side its close frame (its own close, an instance that failed, or a
/// completed closing handshake), how long that side gets to answer before its socket is
/// closed and the connection ends, as a WebSocket endpoint would wait.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How long the proxy's own close waits for bytes already in flight to reach a peer before
/// it gives up on the close frame: a peer that does not read by then gets only the FIN.
pub const STOP_FLUSH: Duration = Duration::from_secs(1);

/// The reason text of the close frame the client gets when the instance failed.
const INSTANCE_FAILED_REASON: &str = "function instance failed";

/// The two close frames of the proxy's own close: unmasked for the client, masked (as a
/// client's must be) for the instance. `None`: `ending` closes TCP without a close frame.
pub struct ProxyClose {
    pub to_client: Vec<u8>,
    pub to_instance: Vec<u8>,
}

impl ProxyClose {
    pub fn for_ending(ending: Ending) -> Option<ProxyClose> {
        let code = proxy_close_code(ending)?;
        let to_function = proxy_close_code_to_function(ending).unwrap_or(code);
        let reason = proxy_close_reason(ending);
        Some(ProxyClose {
            to_client: close_frame(code, reason),
            to_instance: masked_close_frame(to_function, reason, close_mask()),
        })
    }
}

/// A masking key for a frame the proxy sends as a client. RFC 6455 (5.3, 10.3) wants it
/// unpredictable, from a strong source of entropy: a key an observer could guess lets chosen
/// bytes reach the wire unmasked. The clock is guessable, so the OS's CSPRNG.
fn close_mask() -> [u8; 4] {
    let mut mask = [0u8; 4];
    if let Err(e) = getrandom::fill(&mut mask) {
        // Only an OS without a random source gets here; the close must still go out, and
        // a varying key is what the instance's parser needs.
        warn!(error = %e, "no random masking key for the instance's close frame; using the clock");
        mask = (monotonic_ns() as u32).to_ne_bytes();
    }
    mask
}

/// The close frame the client gets when the instance's side ended without one.
pub fn instance_failed_frame(code: u16) -> Vec<u8> {
    close_frame(code, INSTANCE_FAILED_REASON)
}

/// How the proxy ends a connection over a frame it refused (`from_client`: which side sent it):
/// the kernel's mapping, from the flag the kernel would have set.
pub fn refusal_ending(refusal: FrameError, from_client: bool) -> Ending {
    policy::refusal_ending(refusal.flag(), from_client)
        .expect("every refusal has a flag that ends the connection")
}

/// The proxy's close over streams it writes itself: each side that stands between frames gets
/// its close frame, both get a FIN. Each write is bounded by [`STOP_FLUSH`]: a side that does
/// not read gets nothing more.
pub async fn close_streams(
    frames: Option<&ProxyClose>,
    client: &mut (impl AsyncWrite + Unpin),
    client_between_frames: bool,
    instance: &mut (impl AsyncWrite + Unpin),
    instance_between_frames: bool,
) {
    let to_client = frames
        .filter(|_| client_between_frames)
        .map(|f| &f.to_client[..]);
    let to_instance = frames
        .filter(|_| instance_between_frames)
        .map(|f| &f.to_instance[..]);
    tokio::join!(bounded(client, to_client), bounded(instance, to_instance));
}

/// Writes `frame` (if any) and the FIN, within [`STOP_FLUSH`].
async fn bounded(w: &mut (impl AsyncWrite + Unpin), frame: Option<&[u8]>) {
    let _ = tokio::time::timeout(STOP_FLUSH, async {
        if let Some(frame) = frame {
            w.write_all(frame).await?;
        }
        w.shutdown().await
    })
    .await;
}

/// After the instance failed: the client gets the close frame (if it stands between frames)
/// and a FIN, then [`CLOSE_GRACE`] to answer, whose bytes go nowhere.
pub async fn after_instance_failed(
    client: &mut (impl AsyncRead + AsyncWrite + Unpin),
    frame: Option<Vec<u8>>,
) {
    let _ = tokio::time::timeout(STOP_FLUSH, async {
        if let Some(frame) = frame {
            client.write_all(&frame).await?;
        }
        client.shutdown().await
    })
    .await;
    drain_for_grace(client).await;
}

/// Reads and drops what `client` sends until its EOF, for at most [`CLOSE_GRACE`].
pub async fn drain_for_grace(client: &mut (impl AsyncRead + Unpin)) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxys_close_masks_only_the_instances_frame() {
        let close = ProxyClose::for_ending(Ending::IdleTimeout).expect("1001");
        assert_eq!(&close.to_client[..4], &[0x88, 2 + 12, 0x03, 0xE9]);
        assert_eq!(close.to_instance[1], 0x80 | (2 + 12), "mask bit and length");
        assert!(ProxyClose::for_ending(Ending::ExecutionTimeout).is_none());
    }

    /// The instance's close frame: its masking key and its unmasked payload.
    fn unmasked(frame: &[u8]) -> ([u8; 4], Vec<u8>) {
        assert_eq!(frame[0], 0x88, "FIN and opcode close");
        let len = usize::from(frame[1] & 0x7f);
        assert_eq!(frame.len(), 2 + 4 + len, "one short frame");
        let mask: [u8; 4] = frame[2..6].try_into().unwrap();
        let payload = frame[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        (mask, payload)
    }

    #[test]
    fn each_close_toward_the_instance_has_its_own_random_mask_and_unmasks_to_its_code() {
        let closes: Vec<_> = (0..4)
            .map(|_| ProxyClose::for_ending(Ending::IdleTimeout).expect("1001"))
            .collect();
        let masks: std::collections::HashSet<[u8; 4]> = closes
            .iter()
            .map(|c| {
                let (mask, payload) = unmasked(&c.to_instance);
                assert_eq!(&payload[..2], &1001u16.to_be_bytes(), "the code, unmasked");
                assert_eq!(
                    payload[2..],
                    c.to_client[4..],
                    "the same reason as the client's"
                );
                mask
            })
            .collect();
        // Four 32-bit keys from a CSPRNG collide with odds of about 1 in 700 million.
        assert_eq!(masks.len(), 4, "{masks:02x?}");
        // The proxy's own parser reads the code back too.
        let mut side = proxy_common::SideState::default();
        crate::protocols::frames::FrameCursor::default()
            .feed(&closes[0].to_instance, &mut side, 1)
            .unwrap();
        assert_eq!(side.close_code, 1001);
    }

    #[test]
    fn a_refused_frame_ends_the_connection_as_the_kernel_would() {
        use proxy_common::{frame::HeaderError, policy::FrameViolation};
        let too_big = FrameError::Policy(FrameViolation::MessageTooBig);
        let reserved = FrameError::Header(HeaderError::ReservedOpcode);
        assert_eq!(refusal_ending(too_big, true), Ending::MessageTooBig);
        assert_eq!(refusal_ending(reserved, true), Ending::ClientProtocolError);
        assert_eq!(
            refusal_ending(reserved, false),
            Ending::FunctionProtocolError
        );
    }

    #[tokio::test]
    async fn close_streams_sends_frames_only_to_sides_between_frames() {
        let close = ProxyClose::for_ending(Ending::Shutdown).unwrap();
        let (mut client, mut client_peer) = tokio::io::duplex(1024);
        let (mut instance, mut instance_peer) = tokio::io::duplex(1024);
        close_streams(Some(&close), &mut client, true, &mut instance, false).await;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        client_peer.read_to_end(&mut a).await.unwrap();
        instance_peer.read_to_end(&mut b).await.unwrap();
        assert_eq!(a, close.to_client);
        assert!(b.is_empty(), "mid-frame: only the FIN");
    }
}
