//! reachd's finding and checking of hosts against a real mDNS responder (avahi), inside network
//! namespaces this test creates, so that nothing is sent on the machine's own interfaces.
//! Needs root, iproute2, util-linux and avahi-daemon; it fails (never skips) without them.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::time::Duration;

use reachd::address::{Answered, HostAddress};
use reachd::config::ProbeSettings;
use reachd::event::{Event, HostId};
use reachd::probe::{self, Probe, Resolver};
use reachd::reconcile::HostTracker;
use reachd_testkit::netns::{MdnsPair, CLIENT_ADDR, SERVER_ADDR};
use tokio::sync::mpsc;
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_millis(1000);

/// Builds the two namespaces with avahi publishing `rpi.local`, then runs `body` on a thread of
/// its own inside the client namespace (a current-thread runtime there, so every socket the
/// resolver and the checks open belongs to that namespace).
fn in_lab(prefix: &str, body: impl AsyncFnOnce(&mut MdnsPair) + Send) {
    in_pair(prefix, MdnsPair::start, body)
}

/// [`in_lab`] with IPv6 link-local on both sides, avahi publishing the Pi's AAAA too.
fn in_dual_stack_lab(prefix: &str, body: impl AsyncFnOnce(&mut MdnsPair) + Send) {
    in_pair(prefix, MdnsPair::start_dual_stack, body)
}

fn in_pair(
    prefix: &str,
    build: fn(&str, &str) -> std::io::Result<MdnsPair>,
    body: impl AsyncFnOnce(&mut MdnsPair) + Send,
) {
    assert!(
        // SAFETY: plain syscall.
        unsafe { libc::geteuid() } == 0,
        "the mDNS tests create network namespaces: run them as root"
    );
    let mut pair = build(prefix, "rpi").unwrap_or_else(|err| {
        panic!("cannot build the mDNS lab ({err}); install the Debian packages iproute2 util-linux avahi-daemon")
    });
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                pair.client
                    .enter_current_thread()
                    .expect("setns into the client namespace");
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                runtime.block_on(async {
                    tokio::time::timeout(Duration::from_secs(60), body(&mut pair))
                        .await
                        .expect("the test took over 60 s");
                });
            })
            .join()
            .expect("the test thread panicked");
    });
}

fn pi() -> HostAddress {
    HostAddress::v4(SERVER_ADDR)
}

/// A resolver following `rpi.local`, once mDNS has found the Pi.
async fn following_the_pi() -> (Resolver, mpsc::Receiver<Event>) {
    let resolver = Resolver::new().expect("mdns-sd daemon");
    let (tx, mut events) = mpsc::channel(16);
    tokio::spawn(resolver.follow(HostId(0), "rpi.local.".into(), tx));
    match next_event(&mut events, Duration::from_secs(5)).await {
        Event::AddressesFound(HostId(0), addresses) => {
            assert!(addresses.contains(&pi()), "{addresses:?}")
        }
        other => panic!("expected the Pi's address, got {other:?}"),
    }
    (resolver, events)
}

/// Waits for the next address event, failing after `within`.
async fn next_event(events: &mut mpsc::Receiver<Event>, within: Duration) -> Event {
    tokio::time::timeout(within, events.recv())
        .await
        .unwrap_or_else(|_| panic!("no mDNS event within {within:?}"))
        .expect("the resolver stopped")
}

#[test]
fn resolver_finds_the_host_and_the_check_confirms_it() {
    in_lab("rm1-", async |_pair| {
        let (resolver, _events) = following_the_pi().await;
        let answered = probe::check("rpi.local", &[pi()], None, LIMIT, None).await;
        assert_eq!(answered, Ok(Answered::from(pi())));
        // Another name is not answered by the Pi's responder.
        let other = probe::check("nas.local", &[pi()], None, LIMIT, None).await;
        assert!(other.unwrap_err().contains("no mDNS answer for nas.local"));
        resolver.shutdown();
    });
}

#[test]
fn check_fails_at_once_when_the_host_loses_power_though_mdns_still_caches_it() {
    in_lab("rm2-", async |pair| {
        let (resolver, mut events) = following_the_pi().await;
        pair.unplug_server().expect("link down");
        let started = tokio::time::Instant::now();
        let outcome = probe::check("rpi.local", &[pi()], None, LIMIT, None).await;
        let took = started.elapsed();
        assert!(
            outcome.is_err(),
            "a host without power must not answer: {outcome:?}"
        );
        assert!(took <= LIMIT + Duration::from_millis(200), "took {took:?}");
        // mdns-sd says nothing for the records' TTL: that is why reachd checks on its own.
        assert!(
            tokio::time::timeout(Duration::from_secs(2), events.recv())
                .await
                .is_err(),
            "mdns-sd reported a loss it cannot know of yet"
        );
        resolver.shutdown();
    });
}

#[test]
fn goodbye_is_reported_and_the_check_confirms_it() {
    in_lab("rm3-", async |pair| {
        let (resolver, mut events) = following_the_pi().await;
        pair.stop_avahi();
        match next_event(&mut events, Duration::from_secs(5)).await {
            Event::AddressesRemoved(HostId(0), removed) => {
                assert!(removed.contains(&pi()), "{removed:?}")
            }
            other => panic!("expected a goodbye, got {other:?}"),
        }
        let outcome = probe::check("rpi.local", &[pi()], None, LIMIT, None).await;
        assert!(outcome.is_err(), "{outcome:?}");
        resolver.shutdown();
    });
}

/// Drops (or lets through again) every packet the client receives from the Pi, leaving both
/// carriers up: the Pi's announcements go unheard without the Pi seeing its link change. Strict
/// reverse-path filtering drops packets whose source is routed elsewhere, and a blackhole route
/// to the Pi is "elsewhere".
fn deafen_client(pair: &MdnsPair, deaf: bool) {
    let netns = pair.client.name();
    let sysctl = |key: &str| {
        let status = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "sysctl", "-q", "-w", key])
            .status()
            .expect("sysctl runs (procps)");
        assert!(status.success(), "sysctl {key} in {netns}");
    };
    sysctl("net.ipv4.conf.all.rp_filter=1");
    sysctl("net.ipv4.conf.mc0.rp_filter=1");
    let pi = format!("{SERVER_ADDR}/32");
    let verb = if deaf { "add" } else { "del" };
    pair.client
        .ip(&["route", verb, "blackhole", &pi])
        .expect("the blackhole route changes");
}

#[test]
fn after_a_network_change_the_question_goes_out_again_at_once() {
    in_lab("rm6-", async |pair| {
        let started = tokio::time::Instant::now();
        let (resolver, mut events) = following_the_pi().await;
        // The Pi goes away and comes back while this machine hears nothing (as if away from
        // home): its announcements are lost, and mdns-sd's question interval keeps growing.
        pair.stop_avahi();
        match next_event(&mut events, Duration::from_secs(5)).await {
            Event::AddressesRemoved(HostId(0), _) => {}
            other => panic!("expected a goodbye, got {other:?}"),
        }
        deafen_client(pair, true);
        pair.start_avahi().expect("avahi starts again");
        // mdns-sd asks at 0, 1, 3, 7, 15, 31 s...: at 17 s its next question is 14 s away.
        tokio::time::sleep_until(started + Duration::from_secs(17)).await;
        deafen_client(pair, false);
        resolver.interfaces_changed();
        let back = tokio::time::Instant::now();
        match next_event(&mut events, Duration::from_secs(2)).await {
            Event::AddressesFound(HostId(0), found) => assert!(found.contains(&pi()), "{found:?}"),
            other => panic!("expected the Pi found again, got {other:?}"),
        }
        eprintln!("found again {:?} after the network change", back.elapsed());
        resolver.shutdown();
    });
}

/// A dual-stack Pi (the default on Raspberry Pi OS and most laptops) answers on IPv4 and on
/// IPv6 link-local, so each check gets two answers: the tracker must take the IPv4 one every
/// time (units were given it; sshfs needs an IPv6 one in brackets), and not count the Pi's own
/// IPv6 address as another device claiming its name.
#[test]
fn a_dual_stack_host_keeps_its_ipv4_address_check_after_check() {
    in_dual_stack_lab("rm7-", async |pair| {
        let resolver = Resolver::new().expect("mdns-sd daemon");
        let (tx, mut events) = mpsc::channel(16);
        tokio::spawn(resolver.follow(HostId(0), "rpi.local.".into(), tx));
        let mut found: BTreeSet<HostAddress> = BTreeSet::new();
        let pi_v6 = IpAddr::V6(
            pair.server_link_local()
                .expect("the Pi's link-local address"),
        );
        while !(found.contains(&pi()) && found.iter().any(|a| a.ip == pi_v6)) {
            match next_event(&mut events, Duration::from_secs(10)).await {
                Event::AddressesFound(HostId(0), addresses) => found.extend(addresses),
                other => panic!("expected the Pi's addresses, got {other:?}"),
            }
        }
        let v6 = found.iter().find(|a| a.ip == pi_v6).expect("found").clone();
        assert!(
            v6.scope.is_some(),
            "a link-local address carries its interface: {v6}"
        );
        let alone = probe::check("rpi.local", std::slice::from_ref(&v6), None, LIMIT, None).await;
        assert_eq!(
            alone.map(|a| a.address),
            Ok(v6.clone()),
            "the Pi answers on IPv6 too"
        );

        let settings = ProbeSettings::default();
        let mut tracker = HostTracker::new(Instant::now());
        tracker.on_network(Ok(()), Instant::now());
        tracker.on_addresses_found(found.iter().cloned(), Instant::now());
        for round in 0..20 {
            tracker.on_refresh(Instant::now());
            let candidates = tracker.plan(Instant::now()).check.expect("a check is due");
            let outcome = probe::check("rpi.local", &candidates, None, LIMIT, None).await;
            let answered = outcome.clone().expect("the Pi answers");
            assert!(answered.also.contains(&v6), "round {round}: {answered:?}");
            tracker.on_check(tracker.epoch(), outcome, &settings, Instant::now());
            assert_eq!(tracker.address, Some(pi()), "round {round}");
            assert_eq!(
                tracker.reason,
                format!("answered at {SERVER_ADDR}"),
                "round {round}"
            );
        }
        resolver.shutdown();
    });
}

/// A listener on port 2222 at `address` on the Pi's side, opened from a thread inside its
/// namespace.
fn listen_on_the_pi(pair: &MdnsPair, address: IpAddr) -> TcpListener {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                pair.server
                    .enter_current_thread()
                    .expect("setns into the server namespace");
                TcpListener::bind((address, 2222)).expect("listen on 2222")
            })
            .join()
            .expect("listener thread")
    })
}

/// With `port`, a dual-stack host whose service listens on IPv4 only is reachable although its
/// IPv6 address is the best one that answered mDNS (say the address units were given).
#[test]
fn with_a_port_the_hosts_other_kind_of_address_is_tried() {
    in_dual_stack_lab("rm8-", async |pair| {
        let listener = listen_on_the_pi(pair, IpAddr::V4(SERVER_ADDR));
        let pi_v6 = pair
            .server_link_local()
            .expect("the Pi's link-local address");
        let index = pair
            .client
            .run_in(|| {
                let name = std::ffi::CString::new("mc0").expect("no NUL");
                // SAFETY: a NUL-terminated name; the call only reads it.
                unsafe { libc::if_nametoindex(name.as_ptr()) }
            })
            .expect("the client's interface");
        let v6 = HostAddress {
            ip: IpAddr::V6(pi_v6),
            scope: Some((index, "mc0".into())),
        };
        // avahi answers on its IPv6 address once it has probed it, a moment after it appears.
        let deadline = Instant::now() + Duration::from_secs(10);
        while probe::check("rpi.local", std::slice::from_ref(&v6), None, LIMIT, None)
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the Pi never answered at {v6}");
        }
        let candidates = [v6.clone(), pi()];
        let answered = probe::check("rpi.local", &candidates, Some(2222), LIMIT, None).await;
        assert_eq!(
            answered,
            Ok(Answered {
                address: pi(),
                also: vec![v6]
            })
        );
        drop(listener);
        let refused = probe::check("rpi.local", &candidates, Some(2222), LIMIT, None).await;
        let why = refused.unwrap_err();
        assert!(why.starts_with("TCP port 2222 at fe80::"), "{why}");
    });
}

#[test]
fn tcp_port_is_part_of_the_check() {
    in_lab("rm4-", async |pair| {
        let listener = listen_on_the_pi(pair, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(
            probe::check("rpi.local", &[pi()], Some(2222), LIMIT, None).await,
            Ok(Answered::from(pi()))
        );
        drop(listener);
        let refused = probe::check("rpi.local", &[pi()], Some(2222), LIMIT, None).await;
        let why = refused.unwrap_err();
        assert!(why.starts_with("TCP port 2222 at 192.0.2.2:"), "{why}");
        let none = probe::check("rpi.local", &[], Some(2222), LIMIT, None).await;
        assert_eq!(none, Err("rpi.local not found by mDNS".into()));
    });
}

#[test]
fn check_asks_only_through_the_allowed_local_addresses() {
    in_lab("rm5-", async |_pair| {
        let home: BTreeSet<IpAddr> = [IpAddr::V4(CLIENT_ADDR)].into();
        let elsewhere: BTreeSet<IpAddr> = [IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7))].into();
        let through_home = probe::check("rpi.local", &[pi()], None, LIMIT, Some(&home)).await;
        assert_eq!(through_home, Ok(Answered::from(pi())));
        let refused = probe::check("rpi.local", &[pi()], None, LIMIT, Some(&elsewhere)).await;
        assert_eq!(
            refused,
            Err(
                "rpi.local is only reached through another network (192.0.2.2 from 192.0.2.1)"
                    .into()
            )
        );
    });
}
