//! The userspace data plane: copies bytes both ways and walks them with the same frame
//! parser and accounting the kernel uses. Used with `data_plane = "userspace"` and as the
//! fallback when the eBPF programs cannot be loaded.

use std::io;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::socket::monotonic_ns;
use crate::{protocols::frames::FrameCursor, registry::Connection};

/// Which way bytes flow, and which of a connection's two sides they are accounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToInstance = 0,
    InstanceToClient = 1,
}

/// Relays until both directions have seen EOF, or either fails (then both are closed).
pub async fn relay(
    client: TcpStream,
    instance: TcpStream,
    conn: &Connection,
    cursors: [FrameCursor; 2],
) -> io::Result<()> {
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
    let down = pump(
        instance_read,
        client_write,
        conn,
        Direction::InstanceToClient,
        outbound,
    );
    // try_join drops (closes) the other direction as soon as one fails.
    tokio::try_join!(up, down).map(|_| ())
}

async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    conn: &Connection,
    direction: Direction,
    mut cursor: FrameCursor,
) -> io::Result<()> {
    // Per direction and connection: small enough that thousands of idle WebSockets stay
    // cheap, large enough that a 64 KiB message moves in a few reads.
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Half-close: the peer learns of the FIN, the other direction goes on.
            return to.shutdown().await;
        }
        conn.account(direction, |side| {
            cursor.feed(&buf[..n], side, monotonic_ns())
        })
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        to.write_all(&buf[..n]).await?;
    }
}
