//! The userspace data plane: copies bytes both ways and walks them with the same frame
//! parser and accounting the kernel uses. Used with `data_plane = "userspace"` and as the
//! fallback when the eBPF programs cannot be loaded.

use std::io;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use proxy_common::policy::{Ending, close_for_instance_end};

use super::socket::monotonic_ns;
use crate::{
    protocols::frames::{FrameCursor, close_frame},
    registry::Connection,
};

/// Which way bytes flow, and which of a connection's two sides they are accounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToInstance = 0,
    InstanceToClient = 1,
}

/// After the proxy closed the client because the instance failed, how long the client gets
/// to answer the close before its socket is closed.
pub const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Why one direction of the relay stopped.
enum PumpError {
    /// Reading from the sending side failed.
    Read(io::Error),
    /// Writing to the receiving side failed.
    Write(io::Error),
    /// The stream broke the framing rules (or a frame was refused): both sides are closed.
    Frame(io::Error),
}

impl From<PumpError> for io::Error {
    fn from(e: PumpError) -> Self {
        match e {
            PumpError::Read(e) | PumpError::Write(e) | PumpError::Frame(e) => e,
        }
    }
}

/// Relays until both directions have seen EOF, or either fails (then both are closed).
/// When the instance's side ends without a close frame, the client gets the close code
/// [`close_for_instance_end`] decides, and the connection ends as `InstanceFailed`.
pub async fn relay(
    client: TcpStream,
    instance: TcpStream,
    conn: &Connection,
    cursors: [FrameCursor; 2],
) -> io::Result<Ending> {
    let [inbound, outbound] = cursors;
    let (client_read, client_write) = client.into_split();
    let (instance_read, instance_write) = instance.into_split();
    let up = pump(
        client_read,
        instance_write,
        conn,
        Direction::ClientToInstance,
        inbound,
    );
    let down = async {
        let mut client_write = client_write;
        match pump(
            instance_read,
            &mut client_write,
            conn,
            Direction::InstanceToClient,
            outbound,
        )
        .await
        {
            Ok(cursor) | Err((PumpError::Read(_), cursor)) => {
                let side = conn.account(Direction::InstanceToClient, |side| *side);
                match close_for_instance_end(&side) {
                    Some(code) if cursor.at_boundary() => {
                        let frame = close_frame(code, "function instance failed");
                        let _ = client_write.write_all(&frame).await;
                        let _ = client_write.shutdown().await;
                        Ok(Ending::InstanceFailed)
                    }
                    _ => {
                        client_write.shutdown().await?;
                        Ok(Ending::Closed)
                    }
                }
            }
            Err((e, _)) => Err(io::Error::from(e)),
        }
    };
    tokio::pin!(up, down);
    tokio::select! {
        up_result = &mut up => match up_result {
            Ok(_) => down.await,
            // The instance is gone: its side tells the client how.
            Err((PumpError::Write(_), _)) => down.await,
            Err((e, _)) => Err(e.into()),
        },
        down_result = &mut down => {
            let ending = down_result?;
            if ending == Ending::InstanceFailed {
                // The client's answer has nowhere to go; give it a moment, then close.
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut up).await;
            } else {
                up.await.map_err(|(e, _)| io::Error::from(e))?;
            }
            Ok(ending)
        }
    }
}

/// Copies until EOF and returns the cursor, which says whether the stream stopped on a frame
/// boundary. On EOF from the client the instance's write half is shut; the other direction
/// closes the client itself (with a close frame when the instance failed).
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    conn: &Connection,
    direction: Direction,
    mut cursor: FrameCursor,
) -> Result<FrameCursor, (PumpError, FrameCursor)> {
    // Per direction and connection: small enough that thousands of idle WebSockets stay
    // cheap, large enough that a 64 KiB message moves in a few reads.
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => return Err((PumpError::Read(e), cursor)),
        };
        if n == 0 {
            // Half-close: the peer learns of the FIN, the other direction goes on. The
            // instance-to-client direction decides itself how to close the client.
            if direction == Direction::ClientToInstance
                && let Err(e) = to.shutdown().await
            {
                return Err((PumpError::Write(e), cursor));
            }
            return Ok(cursor);
        }
        if let Err(e) = conn.account(direction, |side| {
            cursor.feed(&buf[..n], side, monotonic_ns())
        }) {
            return Err((
                PumpError::Frame(io::Error::new(io::ErrorKind::InvalidData, e)),
                cursor,
            ));
        }
        if let Err(e) = to.write_all(&buf[..n]).await {
            return Err((PumpError::Write(e), cursor));
        }
    }
}
