//! Finding hosts and checking that they answer.
//!
//! Finding: one long-lived mdns-sd daemon for the whole process, one open-ended hostname
//! resolution per host. mdns-sd retransmits its question with a doubling delay (so idle cost
//! falls towards zero) and passes on announcements of a host that boots or changes address as
//! soon as they arrive; its `AddressesRemoved` comes on a goodbye packet or at TTL expiry.
//!
//! Checking: a one-shot unicast mDNS question to each candidate address (see [`query`]), then,
//! when the host has a `port`, a TCP connect. This is what decides "reachable", because mdns-sd's
//! cache keeps answering for a host that lost power until the records' TTL runs out. A check
//! reports every address that answered, not only the one taken: a second device answering
//! the host's name is seen.

pub mod query;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{self, FuturesUnordered, Stream, StreamExt};
use mdns_sd::{HostnameResolutionEvent, IfKind, ScopedIp, ServiceDaemon};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tracing::{debug, warn};

use crate::address::{Answered, HostAddress};
use crate::event::{Event, Events, HostId};

/// The mDNS port, where a responder listens for questions.
const MDNS_PORT: u16 = 5353;
/// After a closed subscription, wait this long before asking mdns-sd again.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);
/// Once the best address answered, how long a check still listens to the other addresses it
/// asked, so that another device answering the host's name is seen. Answers on a LAN take a
/// few milliseconds; only a candidate that never answers costs the whole wait.
const OTHER_ANSWERS: Duration = Duration::from_millis(200);

/// The process's one mdns-sd daemon.
pub struct Resolver {
    daemon: ServiceDaemon,
    /// Bumped at every network change: each follower then asks its question again at once.
    network_changes: watch::Sender<u64>,
}

impl Resolver {
    pub fn new() -> Result<Self, mdns_sd::Error> {
        Ok(Resolver {
            daemon: ServiceDaemon::new()?,
            network_changes: watch::Sender::new(0),
        })
    }
}

impl Resolver {
    /// Every answer mdns-sd gets for `hostname` (with its trailing dot) within `limit`, as it
    /// comes: one look, for `reachd doctor`, where the agent follows instead. mdns-sd reports a
    /// dual-stack host's addresses in more than one answer, in either order, so a look that kept
    /// only the first could miss the address its service listens on.
    pub fn answers(
        &self,
        hostname: &str,
        limit: Duration,
    ) -> impl Stream<Item = Vec<HostAddress>> + Send + 'static {
        let millis = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
        let receiver = self.daemon.resolve_hostname(hostname, Some(millis)).ok();
        let stop = StopResolving {
            daemon: self.daemon.clone(),
            hostname: hostname.to_string(),
        };
        stream::unfold((receiver, stop), |(receiver, stop)| async move {
            let found = loop {
                match receiver.as_ref()?.recv_async().await.ok()? {
                    HostnameResolutionEvent::AddressesFound(_, found) => break found,
                    _ => continue,
                }
            };
            let found = found.iter().map(to_host_address).collect();
            Some((found, (receiver, stop)))
        })
    }
}

/// How a resolution ended.
enum Ended {
    /// The agent is gone.
    AgentGone,
    /// mdns-sd closed it (it does so silently when a receiver falls behind).
    Closed,
    /// The network changed: ask again now.
    NetworkChanged,
}

/// One check to run, as [`check`] takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRequest {
    pub hostname: String,
    pub candidates: Vec<HostAddress>,
    pub port: Option<u16>,
    pub limit: Duration,
    pub via: Option<BTreeSet<IpAddr>>,
}

/// How the agent finds hosts and checks that they answer: [`Resolver`] with mDNS and the
/// network; tests of the agent give it a fake, so that a host can be made reachable, and lost,
/// on private buses without mDNS.
pub trait Probe: Send + Sync + 'static {
    /// Follows `hostname` (with its trailing dot) until the returned future is dropped or
    /// `events` closes, sending what is found and lost about `host`. The agent runs the future
    /// as one of its own tasks.
    fn follow(&self, host: HostId, hostname: String, events: Events) -> BoxFuture<'static, ()>;
    /// NetworkManager changed something: look at the machine's interfaces again.
    fn interfaces_changed(&self);
    /// One check of a host, as [`check`].
    fn check(&self, request: CheckRequest) -> BoxFuture<'static, Result<Answered, String>>;
    /// The agent is stopping.
    fn shutdown(&self);
}

impl Probe for Resolver {
    /// A subscription that mdns-sd closes (it does so silently when a receiver falls behind)
    /// is opened again.
    fn follow(&self, host: HostId, hostname: String, events: Events) -> BoxFuture<'static, ()> {
        let daemon = self.daemon.clone();
        let mut changes = self.network_changes.subscribe();
        Box::pin(async move {
            // mdns-sd goes on asking until told to stop: when the host is no longer followed
            // (a reload removed it), it stops asking too.
            let _stop = StopResolving {
                daemon: daemon.clone(),
                hostname: hostname.clone(),
            };
            loop {
                let ended = match daemon.resolve_hostname(&hostname, None) {
                    Ok(receiver) => {
                        let resolution = forward(host, &hostname, &receiver, &events);
                        tokio::select! {
                            ended = resolution => ended,
                            changed = changes.changed() => match changed {
                                Ok(()) => Ended::NetworkChanged,
                                Err(_) => Ended::AgentGone,
                            },
                        }
                    }
                    Err(err) => {
                        warn!(hostname, "mdns-sd refused to resolve: {err}");
                        Ended::Closed
                    }
                };
                match ended {
                    Ended::AgentGone => return,
                    // mdns-sd repeats a hostname question at doubling intervals, up to an hour,
                    // and re-asks only service questions when interfaces change: a new
                    // resolution asks at once, whatever the uptime.
                    Ended::NetworkChanged => {
                        let _ = daemon.stop_resolve_hostname(&hostname);
                    }
                    Ended::Closed => {
                        debug!(hostname, "mdns-sd closed the resolution; asking again");
                        if events.is_closed() {
                            return;
                        }
                        tokio::time::sleep(RESUBSCRIBE_DELAY).await;
                    }
                }
            }
        })
    }

    /// Tells mdns-sd to look at the machine's interfaces now (NetworkManager just changed
    /// something, and mdns-sd's own check only runs every few seconds, so its first questions
    /// on a new link would otherwise go nowhere), then has every follower ask again. An empty
    /// selection re-reads the interfaces without adding to mdns-sd's list of selections.
    fn interfaces_changed(&self) {
        if let Err(err) = self.daemon.enable_interface(Vec::<IfKind>::new()) {
            warn!("cannot tell mdns-sd about new interfaces: {err}");
        }
        self.network_changes.send_modify(|n| *n += 1);
    }

    fn check(&self, request: CheckRequest) -> BoxFuture<'static, Result<Answered, String>> {
        Box::pin(async move {
            let CheckRequest {
                hostname,
                candidates,
                port,
                limit,
                via,
            } = request;
            check(&hostname, &candidates, port, limit, via.as_ref()).await
        })
    }

    /// Stops the daemon's thread.
    fn shutdown(&self) {
        let _ = self.daemon.shutdown();
    }
}

/// Stops mdns-sd's resolution of `hostname` when dropped.
struct StopResolving {
    daemon: ServiceDaemon,
    hostname: String,
}

impl Drop for StopResolving {
    fn drop(&mut self) {
        let _ = self.daemon.stop_resolve_hostname(&self.hostname);
    }
}

/// Sends what one resolution finds and loses about `host` until it ends.
async fn forward(
    host: HostId,
    hostname: &str,
    receiver: &mdns_sd::Receiver<HostnameResolutionEvent>,
    events: &Events,
) -> Ended {
    while let Ok(event) = receiver.recv_async().await {
        let event = match event {
            HostnameResolutionEvent::AddressesFound(_, found) => {
                Event::AddressesFound(host, found.iter().map(to_host_address).collect())
            }
            HostnameResolutionEvent::AddressesRemoved(_, removed) => {
                Event::AddressesRemoved(host, removed.iter().map(to_host_address).collect())
            }
            other => {
                debug!(hostname, ?other, "mdns-sd");
                continue;
            }
        };
        if events.send(event).await.is_err() {
            return Ended::AgentGone;
        }
    }
    Ended::Closed
}

fn to_host_address(scoped: &ScopedIp) -> HostAddress {
    match scoped {
        ScopedIp::V6(v6) if v6.addr().is_unicast_link_local() => HostAddress {
            ip: IpAddr::V6(*v6.addr()),
            scope: Some((v6.scope_id().index, v6.scope_id().name.clone())),
        },
        other => HostAddress {
            ip: other.to_ip_addr(),
            scope: None,
        },
    }
}

/// One check of a host: the first candidate address that answers the mDNS question (and then
/// accepts a TCP connection on `port`, if given), each step within `limit`, and the other
/// candidates that answered too (see [`OTHER_ANSWERS`]). With `via`, only
/// addresses the kernel routes from one of those local addresses are asked: a host restricted to
/// some connections is not taken for another machine of the same name on another link.
pub async fn check(
    hostname: &str,
    candidates: &[HostAddress],
    port: Option<u16>,
    limit: Duration,
    via: Option<&BTreeSet<IpAddr>>,
) -> Result<Answered, String> {
    if candidates.is_empty() {
        return Err(format!("{hostname} not found by mDNS"));
    }
    if via.is_some_and(BTreeSet::is_empty) {
        return Err(format!(
            "not checked: NetworkManager gave this machine no address on {hostname}'s connections"
        ));
    }
    let mut asks = Vec::with_capacity(candidates.len());
    let mut elsewhere = Vec::new();
    for address in candidates {
        match routed_socket(address) {
            Ok((socket, local)) if via.is_none_or(|via| via.contains(&local)) => {
                asks.push(Box::pin(ask(hostname, address, socket, limit)));
            }
            Ok((_, local)) => elsewhere.push(format!("{address} from {local}")),
            Err(err) => debug!(%address, "no route: {err}"),
        }
    }
    let list = || {
        let list: Vec<String> = candidates.iter().map(ToString::to_string).collect();
        list.join(", ")
    };
    if asks.is_empty() {
        return Err(if elsewhere.is_empty() {
            format!("no route to {hostname} at {}", list())
        } else {
            format!(
                "{hostname} is only reached through another network ({})",
                elsewhere.join(", ")
            )
        });
    }
    let (address, also) = best_answer(asks, OTHER_ANSWERS).await.ok_or_else(|| {
        format!(
            "no mDNS answer for {hostname} from {} within {} ms",
            list(),
            limit.as_millis()
        )
    })?;
    match port {
        None => Ok(Answered { address, also }),
        Some(port) => first_accepting(address, also, port, limit).await,
    }
}

/// Of the addresses that answered, the best one if it accepts a TCP connection on `port`
/// within `limit`, else the first of each other kind (IPv4, IPv6 link-local, other IPv6) that
/// does: a dual-stack host whose service listens on IPv4 only is not lost because its IPv6
/// address answered mDNS first. Another device of the best one's kind is never tried in its
/// place. Fails with the best address's error when none accepts.
async fn first_accepting(
    best: HostAddress,
    also: Vec<HostAddress>,
    port: u16,
    limit: Duration,
) -> Result<Answered, String> {
    let mut answered = also;
    answered.insert(0, best);
    let mut tried: Vec<usize> = Vec::new();
    let mut first_error = None;
    for (rank, address) in answered.iter().enumerate() {
        if tried.iter().any(|&t| answered[t].same_kind(address)) {
            continue;
        }
        tried.push(rank);
        let error = match timeout(limit, TcpStream::connect(address.socket(port))).await {
            Ok(Ok(_stream)) => {
                let address = answered.remove(rank);
                return Ok(Answered {
                    address,
                    also: answered,
                });
            }
            Ok(Err(err)) => format!("TCP port {port} at {address}: {err}"),
            Err(_) => format!(
                "TCP port {port} at {address}: no answer within {} ms",
                limit.as_millis()
            ),
        };
        first_error.get_or_insert(error);
    }
    Err(first_error.unwrap_or_default())
}

/// The answer of the first of `asks` (in their order, best first) that succeeds: a later one's
/// answer is taken only once every earlier one has failed. Each ask ends by its own deadline.
/// With it, in their order, the answers of the other asks that succeeded by then or within
/// `listen` after it.
async fn best_answer<T, F>(asks: Vec<F>, listen: Duration) -> Option<(T, Vec<T>)>
where
    F: std::future::Future<Output = Result<T, ()>>,
{
    let mut pending: FuturesUnordered<_> = asks
        .into_iter()
        .enumerate()
        .map(|(rank, ask)| async move { (rank, ask.await) })
        .collect();
    let mut results: Vec<Option<Result<T, ()>>> = (0..pending.len()).map(|_| None).collect();
    let best = 'decided: {
        while let Some((rank, result)) = pending.next().await {
            results[rank] = Some(result);
            // The best rank not known to have failed: its answer, if it came, is the one.
            for (rank, slot) in results.iter().enumerate() {
                match slot {
                    Some(Err(())) => continue,
                    Some(Ok(_)) => break 'decided rank,
                    None => break,
                }
            }
        }
        return None;
    };
    let rest = async {
        while let Some((rank, result)) = pending.next().await {
            results[rank] = Some(result);
        }
    };
    let _ = timeout(listen, rest).await;
    let best = results[best].take().and_then(Result::ok)?;
    let also = results.into_iter().flatten().filter_map(Result::ok);
    Some((best, also.collect()))
}

/// Sends the question on `socket` (connected to `address`) and waits up to `limit` for its
/// answer, asking a second time halfway in case the first packet was lost.
async fn ask(
    hostname: &str,
    address: &HostAddress,
    socket: UdpSocket,
    limit: Duration,
) -> Result<HostAddress, ()> {
    let fail = |err: std::io::Error| debug!(%address, "mDNS question failed: {err}");
    let question = query::build(next_id(), hostname, address.ip.is_ipv6());
    let deadline = Instant::now() + limit;
    let mut buffer = [0u8; 1500];
    for resend_at in [Instant::now() + limit / 2, deadline] {
        socket.send(&question).await.map_err(fail)?;
        while let Ok(received) = tokio::time::timeout_at(resend_at, socket.recv(&mut buffer)).await
        {
            match received {
                Ok(len) if query::answers(&question, &buffer[..len]) => return Ok(address.clone()),
                Ok(_) => continue,
                // An ICMP error (host or port unreachable) is an answer too: not there.
                Err(err) => {
                    fail(err);
                    return Err(());
                }
            }
        }
    }
    Err(())
}

/// A UDP socket connected to `address`'s mDNS port, and the local address the kernel routes it
/// from. Connected, it only receives from the target: answers from anyone else are dropped. Its
/// packets die at the first router (TTL / hop limit 1): mDNS belongs to the link, and a stale
/// address of another network must not send questions off it. Responders do not check a
/// query's TTL, so the host on the link still answers.
fn routed_socket(address: &HostAddress) -> std::io::Result<(UdpSocket, IpAddr)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let target = address.socket(MDNS_PORT);
    let socket = Socket::new(
        Domain::for_address(target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    match target {
        SocketAddr::V4(_) => socket.set_ttl_v4(1)?,
        SocketAddr::V6(_) => socket.set_unicast_hops_v6(1)?,
    }
    socket.set_nonblocking(true)?;
    // Connecting a UDP socket sends nothing; it picks the route and the local address.
    socket.connect(&target.into())?;
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("local address is not IP"))?
        .ip();
    Ok((UdpSocket::from_std(socket.into())?, local))
}

/// Question IDs only need to differ between questions in flight.
fn next_id() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0x5244);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTEN: Duration = Duration::from_millis(200);

    /// An ask that ends after `ms` with `result`.
    async fn after(ms: u64, result: Result<&'static str, ()>) -> Result<&'static str, ()> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        result
    }

    #[tokio::test(start_paused = true)]
    async fn the_best_ranked_answer_wins_not_the_fastest() {
        let started = Instant::now();
        let asks = vec![
            Box::pin(after(30, Ok("kept"))),
            Box::pin(after(1, Ok("v6"))),
        ];
        assert_eq!(best_answer(asks, LISTEN).await, Some(("kept", vec!["v6"])));
        assert_eq!(started.elapsed(), Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_rank_answers_once_the_better_ones_failed() {
        let started = Instant::now();
        let asks = vec![
            Box::pin(after(1000, Err(()))),
            Box::pin(after(5, Ok("new"))),
            Box::pin(after(2, Err(()))),
        ];
        assert_eq!(best_answer(asks, LISTEN).await, Some(("new", vec![])));
        assert_eq!(started.elapsed(), Duration::from_millis(1000));
        let asks = vec![Box::pin(after(3, Err(()))), Box::pin(after(5, Err(())))];
        assert_eq!(best_answer(asks, LISTEN).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_after_the_best_one_are_listened_to_for_a_while() {
        let started = Instant::now();
        let asks = vec![
            Box::pin(after(10, Ok("pi"))),
            Box::pin(after(10 + 150, Ok("impostor"))),
            Box::pin(after(1000, Ok("too late"))),
            Box::pin(after(20, Err(()))),
        ];
        assert_eq!(
            best_answer(asks, LISTEN).await,
            Some(("pi", vec!["impostor"]))
        );
        assert_eq!(started.elapsed(), Duration::from_millis(10) + LISTEN);
    }
}
