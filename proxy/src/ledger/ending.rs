//! Who closed a connection, for its row: read from how it ended and the first close frame of
//! each direction, the same facts its function status comes from.

use proxy_common::{
    SideState,
    maps::FLAG_CLOSE_SEEN,
    policy::{Ending, proxy_close_code},
};

/// The `closed_by` of a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedBy {
    /// The client's close frame came first, or the client dropped TCP.
    Client,
    /// The function's close frame came first, or its instance failed.
    Function,
    /// wsedge ended it: a timeout, a quota, a protocol error, shutdown.
    Proxy,
    /// wsedge stopped without seeing it end (crash, kill -9).
    Interrupted,
}

impl ClosedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Function => "function",
            ClosedBy::Proxy => "proxy",
            ClosedBy::Interrupted => "interrupted",
        }
    }
}

/// Who closed first, and the code of the first close frame of that side (for the proxy: the
/// code it sent the client), `None` when it sent none. `client_side` counts client ->
/// instance.
pub fn how_it_closed(
    ending: Ending,
    client_side: &SideState,
    function_side: &SideState,
) -> (ClosedBy, Option<u16>) {
    let code = |s: &SideState| (s.flags & FLAG_CLOSE_SEEN != 0).then_some(s.close_code as u16);
    match ending {
        Ending::Closed => {
            match (code(client_side), code(function_side)) {
                (Some(_), Some(f)) if function_side.close_at_ns < client_side.close_at_ns => {
                    (ClosedBy::Function, Some(f))
                }
                (Some(c), _) => (ClosedBy::Client, Some(c)),
                (None, Some(f)) => (ClosedBy::Function, Some(f)),
                // Neither sent a close frame: the client dropped TCP (a function dropping it
                // is `InstanceFailed`).
                (None, None) => (ClosedBy::Client, None),
            }
        }
        Ending::InstanceFailed => (ClosedBy::Function, code(function_side)),
        Ending::IdleTimeout
        | Ending::ExecutionTimeout
        | Ending::MessageTooBig
        | Ending::RateExceeded
        | Ending::Shutdown
        | Ending::ClientProtocolError
        | Ending::FunctionProtocolError => (ClosedBy::Proxy, proxy_close_code(ending)),
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::policy::function_status;

    use super::*;

    fn closed(code: u16, at: u64) -> SideState {
        SideState::with_close(code, at)
    }

    #[test]
    fn the_side_whose_close_frame_came_first_closed_it_with_its_code() {
        let none = SideState::default();
        let c = |client: &SideState, function: &SideState| {
            how_it_closed(Ending::Closed, client, function)
        };
        assert_eq!(
            c(&closed(1000, 1), &closed(1000, 2)),
            (ClosedBy::Client, Some(1000))
        );
        assert_eq!(
            c(&closed(1000, 3), &closed(4001, 2)),
            (ClosedBy::Function, Some(4001))
        );
        assert_eq!(c(&none, &closed(1011, 2)), (ClosedBy::Function, Some(1011)));
        assert_eq!(c(&none, &none), (ClosedBy::Client, None));
    }

    #[test]
    fn closed_by_agrees_with_the_function_status_on_who_came_first() {
        // 456 is the client's fault and 439 the function's: the row must name the same side.
        for (client, function) in [
            (closed(4000, 1), closed(1000, 2)),
            (closed(1000, 3), closed(4001, 2)),
            (SideState::default(), closed(4001, 2)),
        ] {
            let status = function_status(Ending::Closed, &client, &function);
            let (by, _) = how_it_closed(Ending::Closed, &client, &function);
            let expected = if status == 456 {
                ClosedBy::Client
            } else {
                ClosedBy::Function
            };
            assert_eq!(by, expected, "status {status}");
        }
    }

    #[test]
    fn the_proxy_closes_with_the_code_it_sent_the_client() {
        let none = SideState::default();
        let p = |ending| how_it_closed(ending, &none, &none);
        assert_eq!(p(Ending::IdleTimeout), (ClosedBy::Proxy, Some(1001)));
        assert_eq!(p(Ending::MessageTooBig), (ClosedBy::Proxy, Some(1009)));
        assert_eq!(p(Ending::RateExceeded), (ClosedBy::Proxy, Some(1008)));
        assert_eq!(p(Ending::ExecutionTimeout), (ClosedBy::Proxy, None));
        assert_eq!(p(Ending::InstanceFailed), (ClosedBy::Function, None));
    }
}
