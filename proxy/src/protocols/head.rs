//! Reading an HTTP/1.1 message head (request or response) from a stream, with a size limit.
//! Bytes that arrive after the head are returned too: they belong to the WebSocket stream.

use tokio::io::{AsyncRead, AsyncReadExt};

/// A message head and whatever followed it in the same reads.
#[derive(Debug)]
pub struct Head {
    /// The head, up to and including the blank line.
    pub head: Vec<u8>,
    /// Bytes read after the head.
    pub rest: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("head exceeds {0} bytes")]
    TooLarge(usize),
    #[error("connection closed before the head was complete")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads until the end of the head (`\r\n\r\n`) or until `limit` bytes without one. Empty
/// lines before the head are part of it (and count against `limit`): RFC 9112 (2.2) has a
/// server ignore them, and the parser does, so they must not end the head either.
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
) -> Result<Head, HeadError> {
    // Starts small and grows: upgrade heads are a few hundred bytes, and thousands of
    // handshakes may be in flight at once.
    let mut buf = Vec::with_capacity(512);
    // Where the head's first line starts, once known: after the empty lines before it.
    let mut first_line: Option<usize> = None;
    let mut skipped = 0;
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.len().clamp(512, 8192));
        }
        let before = buf.len();
        let n = stream.read_buf(&mut buf).await?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        let start = match first_line {
            Some(start) => start,
            None => {
                skipped += empty_lines(&buf[skipped..]);
                // A lone `\r` at the end may still become an empty line.
                if skipped == buf.len() || buf[skipped..] == *b"\r" {
                    if buf.len() > limit {
                        return Err(HeadError::TooLarge(limit));
                    }
                    continue;
                }
                first_line = Some(skipped);
                skipped
            }
        };
        // Only the new bytes and the 3 before them can complete a terminator.
        let search_from = before.saturating_sub(3).max(start);
        if let Some(end) = find_terminator(&buf[search_from..]) {
            let end = search_from + end + 4;
            if end > limit {
                return Err(HeadError::TooLarge(limit));
            }
            let rest = buf.split_off(end);
            return Ok(Head { head: buf, rest });
        }
        if buf.len() > limit {
            return Err(HeadError::TooLarge(limit));
        }
    }
}

fn find_terminator(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n")
}

/// How many bytes of `bytes` are whole empty lines (`\r\n` or a bare `\n`, as the parser
/// takes them).
fn empty_lines(bytes: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match &bytes[at..] {
            [b'\r', b'\n', ..] => at += 2,
            [b'\n', ..] => at += 1,
            _ => return at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_head_from_following_bytes_across_reads() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            a.write_all(b"GET / HTTP/1.1\r\nHost: x\r").await.unwrap();
            a.write_all(b"\n\r\n\x81\x00").await.unwrap();
        });
        let head = read_head(&mut b, 1024).await.unwrap();
        assert_eq!(head.head, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(head.rest, b"\x81\x00");
    }

    #[tokio::test]
    async fn empty_lines_before_the_head_do_not_end_it() {
        let data = b"\r\n\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n\x81\x00";
        for chunk in [1, 3, data.len()] {
            let mut reader = tokio_test_reader(data, chunk);
            let head = read_head(&mut reader, 1024).await.unwrap();
            assert_eq!(head.head, data[..data.len() - 2], "in reads of {chunk}");
        }
        let only_empty = b"\r\n\r\n\r\n";
        let err = read_head(&mut &only_empty[..], 1024).await.unwrap_err();
        assert!(matches!(err, HeadError::Closed), "{err:?}");
        let flood = b"\r\n".repeat(1000);
        let err = read_head(&mut &flood[..], 1024).await.unwrap_err();
        assert!(
            matches!(err, HeadError::TooLarge(1024)),
            "empty lines count: {err:?}"
        );
    }

    /// `data` in reads of at most `chunk` bytes.
    fn tokio_test_reader(data: &[u8], chunk: usize) -> impl AsyncRead + Unpin {
        let (mut a, b) = tokio::io::duplex(chunk);
        let data = data.to_vec();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in data.chunks(chunk) {
                a.write_all(piece).await.unwrap();
            }
        });
        b
    }

    #[tokio::test]
    async fn rejects_heads_over_the_limit() {
        let data = vec![b'a'; 3000];
        let err = read_head(&mut &data[..], 2048).await.unwrap_err();
        assert!(matches!(err, HeadError::TooLarge(2048)));
    }
}
