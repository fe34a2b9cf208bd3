//! The kernel's trace ring and its listener count, as userspace holds them (see
//! `proxy_common::trace`).

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{Array, MapData, RingBuf},
};
use proxy_common::trace::TraceRecord;

use super::LoadError;

pub struct TraceRing {
    ring: Mutex<RingBuf<MapData>>,
    /// `[0]` listeners (written here), `[1]` records lost to a full ring (written there).
    control: Mutex<Array<MapData, u32>>,
}

impl TraceRing {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<TraceRing, LoadError> {
        let mut map = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or_else(|| LoadError::Map(name, "missing from object".into()))
        };
        let ring =
            RingBuf::try_from(map("TRACE")?).map_err(|e| LoadError::Map("TRACE", e.to_string()))?;
        let control = Array::try_from(map("TRACING")?)
            .map_err(|e| LoadError::Map("TRACING", e.to_string()))?;
        Ok(TraceRing {
            ring: Mutex::new(ring),
            control: Mutex::new(control),
        })
    }

    /// Turns the programs' trace points on (`n > 0`) or off.
    pub fn set_listeners(&self, n: u32) -> io::Result<()> {
        self.control
            .lock()
            .expect("trace control lock")
            .set(0, n, 0)
            .map_err(io::Error::other)
    }

    /// Records lost to a full ring since the programs were loaded.
    pub fn lost(&self) -> u32 {
        self.control
            .lock()
            .expect("trace control lock")
            .get(&1, 0)
            .unwrap_or(0)
    }

    /// Hands every record waiting in the ring to `each`, oldest first.
    pub fn drain(&self, each: impl FnMut(TraceRecord)) {
        let mut ring = self.ring.lock().expect("trace ring lock");
        super::maps::drain_records(&mut ring, each);
    }

    /// A descriptor that polls readable when records wait (for an async reader; reading
    /// goes through [`Self::drain`]).
    pub fn readiness(&self) -> io::Result<OwnedFd> {
        self.ring
            .lock()
            .expect("trace ring lock")
            .as_fd()
            .try_clone_to_owned()
    }
}
