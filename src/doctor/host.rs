//! The one real check of each host that `reachd doctor` makes: found by mDNS now, and answering
//! the agent's own check (the unicast mDNS question, then the TCP port), from the addresses the
//! host's `connections` allow, exactly as the agent would check it on this network.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::pin;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tokio::time::timeout_at;

use super::Finding;
use crate::address::{Answered, HostAddress};
use crate::config::{Config, HostConfig};
use crate::network;
use crate::probe::{self, Probe, Resolver};
use crate::reconcile::NetworkView;

/// How long mdns-sd may take to find a host: a cold daemon's first question can miss (it may go
/// out before the daemon joined every interface), and it asks again after a second.
const FIND_LIMIT: Duration = Duration::from_secs(3);

/// Checks every host; `network` is NetworkManager's view (`None`: it could not be read, and the
/// agent would assume a network).
/// `firewall`: a firewall unit active on the machine, which may drop mDNS answers.
pub async fn check_all(
    config: &Config,
    network: Option<&NetworkView>,
    firewall: Option<&str>,
    emit: &mut impl FnMut(Finding),
) {
    let view = network.cloned().unwrap_or_else(network::assumed_view);
    let mut resolver = None;
    for host in &config.hosts {
        if network.is_none() && !host.connections.is_empty() {
            emit(not_checked(
                host,
                "NetworkManager cannot say whether one of its connections is active",
            ));
            continue;
        }
        if let Err(why) = view.verdict(host) {
            emit(not_checked(host, &why));
            continue;
        }
        let via = view.local_addresses_for(host);
        if via.as_ref().is_some_and(|v| v.is_empty()) {
            emit(not_checked(
                host,
                "NetworkManager gives this machine no address on its connections",
            ));
            continue;
        }
        if resolver.is_none() {
            match Resolver::new() {
                Ok(started) => resolver = Some(started),
                Err(err) => {
                    emit(Finding::fail(
                        format!("cannot start the mDNS resolver ({err})"),
                        "reachd needs UDP port 5353 and multicast on your network interfaces",
                    ));
                    return;
                }
            }
        }
        let Some(resolver) = &resolver else { return };
        let started = Instant::now();
        let answers = resolver.answers(&host.fqdn(), FIND_LIMIT);
        let outcome = judge(answers, FIND_LIMIT, |candidates| {
            let via = via.clone();
            async move {
                let limit = config.probe.timeout;
                probe::check(&host.hostname, &candidates, host.port, limit, via.as_ref()).await
            }
        })
        .await;
        emit(answer_finding(host, outcome, started.elapsed(), firewall));
    }
    if let Some(resolver) = resolver {
        resolver.shutdown();
    }
}

/// Judges a host as the agent does, which checks it again each time mDNS reports an address:
/// `check` with every address of `answers` so far, again at each new one, until a check
/// succeeds or `limit` runs out. The last check's failure otherwise (`check` of no address when
/// nothing was found, which says so). A dual-stack host whose first answer is only its IPv6
/// address, where its service does not listen, is then judged by its IPv4 address too.
async fn judge<C, F>(
    answers: impl Stream<Item = Vec<HostAddress>>,
    limit: Duration,
    mut check: C,
) -> Result<Answered, String>
where
    C: FnMut(Vec<HostAddress>) -> F,
    F: Future<Output = Result<Answered, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut answers = pin!(answers);
    // Ordered IPv4 first, the address the agent gives units.
    let mut known = BTreeSet::new();
    let mut failed = None;
    while let Ok(Some(found)) = timeout_at(deadline, answers.next()).await {
        let before = known.len();
        known.extend(found);
        if known.len() == before {
            continue;
        }
        match check(known.iter().cloned().collect()).await {
            Ok(answered) => return Ok(answered),
            Err(why) => failed = Some(why),
        }
    }
    match failed {
        Some(why) => Err(why),
        None => check(Vec::new()).await,
    }
}

fn not_checked(host: &HostConfig, why: &str) -> Finding {
    Finding::warn(
        format!("{}: {} not checked: {why}", host.name, host.hostname),
        "nothing to fix if you are away from it; at home, see `nmcli connection show --active`",
    )
}

/// What the doctor says about one check. A host that does not answer is a warning: being away
/// from it is no misconfiguration. Another device answering the host's name at an address of
/// the same kind (see [`crate::address::HostAddress::same_kind`]) is a warning too: an impostor, or a host with
/// two interfaces on the LAN.
pub fn answer_finding(
    host: &HostConfig,
    outcome: Result<Answered, String>,
    took: Duration,
    firewall: Option<&str>,
) -> Finding {
    match outcome {
        Ok(Answered { address, also }) => {
            let answers = format!(
                "{}: {} answers at {address}{} ({} ms)",
                host.name,
                host.hostname,
                host.port
                    .map(|p| format!(", TCP port {p} open"))
                    .unwrap_or_default(),
                took.as_millis()
            );
            let others: Vec<String> = also
                .iter()
                .filter(|a| a.same_kind(&address))
                .map(ToString::to_string)
                .collect();
            if others.is_empty() {
                Finding::ok(answers)
            } else {
                Finding::warn(
                    format!("{answers}; also answered by {}", others.join(", ")),
                    "if that device is not the host, find it on your LAN; pin the host's ssh key \
                     in its units (HostKeyAlias=, StrictHostKeyChecking=yes, as the examples in \
                     systemd/ do) so that it can never get a session",
                )
            }
        }
        Err(why) => {
            let blocked = firewall.map(|unit| {
                format!(
                    "; {unit} is active: unless it lets UDP port 5353 in, mDNS answers never \
                     arrive (docs/agent.md, \"Firewalls\")"
                )
            });
            Finding::warn(
                format!("{}: {} does not answer now: {why}", host.name, host.hostname),
                format!(
                    "nothing to fix if you are away from it; at home, is it on and on this network? (`avahi-resolve -n {}` asks the same question){}",
                    host.hostname,
                    blocked.unwrap_or_default()
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::HostAddress;
    use crate::doctor::Level;

    fn host(port: Option<u16>) -> HostConfig {
        HostConfig {
            name: "rpi".into(),
            hostname: "rpi.local".into(),
            target: "rpi-accessible.target".into(),
            port,
            connections: vec!["3f9a7c1e-5b2d-4e8f-9a61-0c2b7d4e1a01".into()],
            nix: None,
            upload: None,
            builder: None,
        }
    }

    #[test]
    fn an_answer_names_the_address_and_port() {
        let address = HostAddress {
            ip: "192.0.2.10".parse().unwrap(),
            scope: None,
        };
        let finding = answer_finding(
            &host(Some(22)),
            Ok(address.into()),
            Duration::from_millis(12),
            None,
        );
        assert_eq!(
            finding.to_string(),
            "ok   rpi: rpi.local answers at 192.0.2.10, TCP port 22 open (12 ms)"
        );
    }

    #[test]
    fn another_device_answering_the_name_is_a_warning_but_the_hosts_own_ipv6_is_not() {
        let v4 = |ip: &str| HostAddress {
            ip: ip.parse().unwrap(),
            scope: None,
        };
        let own_v6 = HostAddress {
            ip: "fe80::1".parse().unwrap(),
            scope: Some((2, "wlan0".into())),
        };
        let dual_stack = Answered {
            address: v4("192.0.2.10"),
            also: vec![own_v6.clone()],
        };
        let finding = answer_finding(&host(None), Ok(dual_stack), Duration::ZERO, None);
        assert_eq!(finding.level, Level::Ok);
        let impostor = Answered {
            address: v4("192.0.2.10"),
            also: vec![own_v6, v4("192.0.2.66")],
        };
        let finding = answer_finding(&host(None), Ok(impostor), Duration::ZERO, None);
        assert_eq!(finding.level, Level::Warn);
        assert_eq!(
            finding.what,
            "rpi: rpi.local answers at 192.0.2.10 (0 ms); also answered by 192.0.2.66"
        );
    }

    #[test]
    fn no_answer_is_a_warning_with_the_reason() {
        let finding = answer_finding(
            &host(None),
            Err("rpi.local not found by mDNS".into()),
            Duration::ZERO,
            None,
        );
        assert_eq!(finding.level, Level::Warn);
        assert_eq!(
            finding.what,
            "rpi: rpi.local does not answer now: rpi.local not found by mDNS"
        );
        assert!(!finding.fix.expect("a fix").contains("5353"));
        let behind = answer_finding(
            &host(None),
            Err("rpi.local not found by mDNS".into()),
            Duration::ZERO,
            Some("firewalld.service"),
        );
        let fix = behind.fix.expect("a fix");
        assert!(
            fix.contains("firewalld.service is active") && fix.contains("UDP port 5353"),
            "{fix}"
        );
    }

    /// mDNS answers as they come: `(after ms, addresses)`, times from the start.
    fn answers_at(answers: Vec<(u64, Vec<HostAddress>)>) -> impl Stream<Item = Vec<HostAddress>> {
        let started = tokio::time::Instant::now();
        futures_util::stream::iter(answers).then(move |(ms, found)| async move {
            tokio::time::sleep_until(started + Duration::from_millis(ms)).await;
            found
        })
    }

    /// A dual-stack host whose sshd listens on IPv4 only: a check succeeds only with its IPv4
    /// address among the candidates.
    async fn ssh_on_ipv4_only(candidates: Vec<HostAddress>) -> Result<Answered, String> {
        let mut also = candidates.clone();
        match candidates.iter().position(|a| a.ip.is_ipv4()) {
            Some(v4) => Ok(Answered {
                address: also.remove(v4),
                also,
            }),
            None if candidates.is_empty() => Err("rpi.local not found by mDNS".into()),
            None => Err(format!(
                "TCP port 22 at {}: Connection refused",
                candidates[0]
            )),
        }
    }

    fn link_local() -> HostAddress {
        HostAddress {
            ip: "fe80::1".parse().unwrap(),
            scope: Some((2, "lh0".into())),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dual_stack_host_whose_first_answer_is_its_ipv6_address_is_judged_by_both() {
        let v4 = HostAddress::v4("192.0.2.10".parse().unwrap());
        let mut checked = Vec::new();
        let answers = answers_at(vec![(5, vec![link_local()]), (40, vec![v4.clone()])]);
        let outcome = judge(answers, FIND_LIMIT, |candidates| {
            checked.push(candidates.len());
            ssh_on_ipv4_only(candidates)
        })
        .await;
        assert_eq!(
            outcome,
            Ok(Answered {
                address: v4,
                also: vec![link_local()]
            })
        );
        assert_eq!(checked, [1, 2], "checked at each new address");
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_failure_stands_when_no_better_answer_comes_in_time() {
        let started = tokio::time::Instant::now();
        let late = HostAddress::v4("192.0.2.10".parse().unwrap());
        let answers = answers_at(vec![
            (5, vec![link_local()]),
            (5, vec![link_local()]),
            (FIND_LIMIT.as_millis() as u64 + 1, vec![late]),
        ]);
        let outcome = judge(answers, FIND_LIMIT, ssh_on_ipv4_only).await;
        assert_eq!(
            outcome,
            Err("TCP port 22 at fe80::1%lh0: Connection refused".into())
        );
        assert_eq!(started.elapsed(), FIND_LIMIT);
        let nothing = judge(answers_at(vec![]), FIND_LIMIT, ssh_on_ipv4_only).await;
        assert_eq!(nothing, Err("rpi.local not found by mDNS".into()));
    }

    #[tokio::test]
    async fn a_host_off_its_connections_is_not_checked_and_nothing_is_sent() {
        let config = crate::config::parse(
            "[[host]]\nname = \"rpi\"\nhostname = \"rpi.local\"\nconnections = [\"3f9a7c1e-5b2d-4e8f-9a61-0c2b7d4e1a01\"]\n",
            "test",
        )
        .unwrap();
        let mut findings = Vec::new();
        let away = NetworkView {
            connected: true,
            active: Default::default(),
        };
        check_all(&config, Some(&away), None, &mut |f| findings.push(f)).await;
        check_all(&config, None, None, &mut |f| findings.push(f)).await;
        let said: Vec<&str> = findings.iter().map(|f| f.what.as_str()).collect();
        assert_eq!(
            said,
            [
                "rpi: rpi.local not checked: not on one of the host's configured connections",
                "rpi: rpi.local not checked: NetworkManager cannot say whether one of its connections is active",
            ]
        );
        assert!(findings.iter().all(|f| f.level == Level::Warn));
    }
}
