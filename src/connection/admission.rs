//! Admission at accept time: the limits, the probe reserve, and making room at the limit by
//! closing a connection that holds a slot for nothing.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::Instant,
};

use super::{
    limits::*,
    registry::{Connections, Episode},
    tracked::{AtLimit, ConnectionGuard, Counts, Tracked},
};

impl Counts {
    /// Picks the connection to close so that a new one on `listener` fits: one that costs its
    /// sender little and holds a slot for nothing, an incomplete head or a connection that has
    /// sent nothing yet, from the address holding the most connections, oldest first; an idle
    /// kept-alive connection (or one whose client has stopped reading its response, see
    /// [`WRITE_BLOCKED_EVICTABLE`]) only when none is left. Never a request in progress, a
    /// response being taken in by its client or a WebSocket, and never a connection already
    /// being closed.
    fn eviction_candidate(&self, listener: Listener) -> Option<&Arc<Tracked>> {
        let busiest = self
            .per_ip
            .iter()
            .filter(|((kind, _), _)| *kind == listener)
            .map(|(_, count)| *count)
            .max()?;
        let mut best: Option<(usize, u8, &Arc<Tracked>)> = None;
        // `open` is ordered by id, that is by age: the first of a rank is the oldest.
        for tracked in self.open.values() {
            if tracked.key.0 != listener || tracked.shed.is_closed() {
                continue;
            }
            let rank = match tracked.phase() {
                // A response its client has stopped reading frees nothing by being kept.
                Phase::Idle if tracked.write_stalled() => 1,
                Phase::Idle if tracked.responding() => continue,
                Phase::Head => 0,
                Phase::Idle if tracked.requests() == 0 => 0,
                Phase::Idle => 1,
                Phase::Busy | Phase::Body | Phase::Upgraded => continue,
            };
            let count = self.per_ip.get(&tracked.key).copied().unwrap_or(0);
            let better = best.is_none_or(|(best_count, best_rank, _)| {
                (count, std::cmp::Reverse(rank)) > (best_count, std::cmp::Reverse(best_rank))
            });
            if better {
                best = Some((count, rank, tracked));
                if count == busiest && rank == 0 {
                    break;
                }
            }
        }
        best.map(|(_, _, tracked)| tracked)
    }
}

impl Connections {
    /// Admits a connection from `ip` on `listener`, or refuses it.
    ///
    /// The gateway may use `max_connections` minus [`PROBE_RESERVE`]; the probe listener the
    /// whole of it, so a flood on the gateway leaves room for `/health`. At that limit a new
    /// connection still gets in by closing one that holds a slot for nothing (see
    /// [`Counts::eviction_candidate`]): otherwise a flood of slow heads on the single port
    /// would refuse every probe and client while it lasts. Closing takes a moment, so at most
    /// [`EVICTION_SLACK`] connections may be open beyond the limit meanwhile.
    ///
    /// # Errors
    ///
    /// Returns the [`Refusal`] (and whether an episode at the limit starts) past a limit with
    /// nothing to close.
    pub fn admit(
        &self,
        listener: Listener,
        ip: IpAddr,
    ) -> (Result<ConnectionGuard, Refusal>, Episode) {
        self.admit_at(listener, ip, Instant::now())
    }

    fn admit_at(
        &self,
        listener: Listener,
        ip: IpAddr,
        now: Instant,
    ) -> (Result<ConnectionGuard, Refusal>, Episode) {
        let mut counts = self.shared.lock();
        let gateway_cap = self
            .max_connections
            .saturating_sub(PROBE_RESERVE.min(self.max_connections / 2))
            .max(1);
        let key = (listener, ip);
        let at_limit = counts.total.saturating_sub(counts.evicting) >= self.max_connections
            || (listener == Listener::Gateway
                && counts.gateway.saturating_sub(counts.evicting_gateway) >= gateway_cap);
        let refusal = if counts.per_ip.get(&key).copied().unwrap_or(0) >= self.max_per_ip {
            Some(Refusal::PerIp)
        } else if !at_limit {
            None
        } else if counts.evicting < EVICTION_SLACK
            && let Some(victim) = counts.eviction_candidate(listener)
        {
            victim.evicted.store(true, Ordering::Release);
            victim.shed.close();
            counts.evicting += 1;
            if listener == Listener::Gateway {
                counts.evicting_gateway += 1;
            }
            None
        } else {
            Some(Refusal::Global)
        };
        let episode = if at_limit || refusal.is_some() {
            let evicted = u64::from(refusal.is_none());
            let refused = u64::from(refusal.is_some());
            match &mut counts.at_limit {
                Some(episode) => {
                    episode.evicted += evicted;
                    episode.refused += refused;
                    episode.last = now;
                    Episode::Quiet
                }
                None => {
                    counts.at_limit = Some(AtLimit {
                        started: now,
                        last: now,
                        refused,
                        evicted,
                    });
                    Episode::Started
                }
            }
        } else {
            match counts
                .at_limit
                .take_if(|episode| now.saturating_duration_since(episode.last) >= EPISODE_QUIET)
            {
                Some(episode) => Episode::Ended {
                    refused: episode.refused,
                    evicted: episode.evicted,
                    lasted: episode.last.saturating_duration_since(episode.started),
                },
                None => Episode::Quiet,
            }
        };
        if let Some(refusal) = refusal {
            return (Err(refusal), episode);
        }
        counts.next_id += 1;
        let id = counts.next_id;
        counts.total += 1;
        if listener == Listener::Gateway {
            counts.gateway += 1;
        }
        *counts.per_ip.entry(key).or_insert(0) += 1;
        let (sender, receiver) = async_channel::bounded(1);
        let tracked = Arc::new(Tracked {
            id,
            key,
            evicted: AtomicBool::new(false),
            head_closed: AtomicBool::new(false),
            responding: AtomicBool::new(false),
            write_blocked: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::Idle as u8),
            requests: AtomicU64::new(0),
            fixed_bytes: AtomicU64::new(0),
            buffer_bytes: AtomicU64::new(0),
            charged_bytes: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            registry: Arc::clone(&self.shared),
            shed: sender,
        });
        counts.open.insert(id, Arc::clone(&tracked));
        let total = counts.total;
        drop(counts);
        tracked.set_phase(Phase::Idle);
        self.shared.open_gauge.set(total as f64);
        (
            Ok(ConnectionGuard {
                tracked,
                key,
                shed: receiver,
            }),
            episode,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::connection::{IP, OTHER, registry};

    #[test]
    fn per_ip_cap_refuses_one_address_but_not_another() {
        let connections = registry(100, 2);
        let _a = connections.admit(Listener::Gateway, IP).0.unwrap();
        let _b = connections.admit(Listener::Gateway, IP).0.unwrap();
        let (third, episode) = connections.admit(Listener::Gateway, IP);
        assert_eq!(third.unwrap_err(), Refusal::PerIp);
        assert_eq!(episode, Episode::Started);
        let (other, episode) = connections.admit(Listener::Gateway, OTHER);
        assert!(other.is_ok());
        assert_eq!(
            episode,
            Episode::Quiet,
            "the episode ends only after a quiet period"
        );
    }

    #[test]
    fn a_flood_that_keeps_dipping_below_the_limit_is_one_episode() {
        let connections = registry(100, 1);
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let held = connections
            .admit_at(Listener::Gateway, IP, at(0))
            .0
            .unwrap();
        let (refused, episode) = connections.admit_at(Listener::Gateway, IP, at(10));
        assert!(refused.is_err());
        assert_eq!(episode, Episode::Started);
        // Below the limit for moments between refusals, for 20 seconds: one episode.
        for tick in 1..=200 {
            let (admitted, episode) =
                connections.admit_at(Listener::Gateway, OTHER, at(10 + tick * 100));
            assert_eq!(episode, Episode::Quiet, "at {tick}");
            drop(admitted);
            let (refused, episode) =
                connections.admit_at(Listener::Gateway, IP, at(60 + tick * 100));
            assert!(refused.is_err());
            assert_eq!(episode, Episode::Quiet, "at {tick}");
        }
        let last = at(60 + 200 * 100);
        // Not quite quiet long enough yet.
        let (_, episode) = connections.admit_at(
            Listener::Gateway,
            OTHER,
            last + EPISODE_QUIET - Duration::from_millis(1),
        );
        assert_eq!(episode, Episode::Quiet);
        let (_, episode) = connections.admit_at(Listener::Gateway, OTHER, last + EPISODE_QUIET);
        assert_eq!(
            episode,
            Episode::Ended {
                refused: 201,
                evicted: 0,
                lasted: last - at(10),
            }
        );
        drop(held);
    }

    /// Admits a connection that is running a request, which nothing may close.
    fn busy(connections: &Connections, listener: Listener, ip: IpAddr) -> Option<ConnectionGuard> {
        let guard = connections.admit(listener, ip).0.ok()?;
        guard.tracked().set_phase(Phase::Busy);
        Some(guard)
    }

    #[test]
    fn gateway_leaves_a_reserve_for_probes() {
        let connections = registry(40, 100);
        let held: Vec<_> = (0..40)
            .map_while(|_| busy(&connections, Listener::Gateway, IP))
            .collect();
        assert_eq!(held.len(), 40 - PROBE_RESERVE);
        assert!(connections.admit(Listener::Probes, IP).0.is_ok());
    }

    #[test]
    fn at_the_limit_the_oldest_head_of_the_busiest_address_makes_room() {
        let connections = registry(40, 100);
        let cap = 40 - PROBE_RESERVE;
        let busy_ones: Vec<_> = (0..cap - 5)
            .map_while(|_| busy(&connections, Listener::Gateway, OTHER))
            .collect();
        let streaming = connections.admit(Listener::Gateway, OTHER).0.unwrap();
        streaming.tracked().set_phase(Phase::Busy);
        streaming.tracked().set_phase(Phase::Idle);
        streaming.tracked().set_responding(true);
        let kept_alive = connections.admit(Listener::Gateway, IP).0.unwrap();
        kept_alive.tracked().set_phase(Phase::Busy);
        kept_alive.tracked().set_phase(Phase::Idle);
        let [old_head, new_head, nothing_yet] = [(); 3].map(|_| {
            let guard = connections.admit(Listener::Gateway, OTHER).0.unwrap();
            guard.tracked().set_phase(Phase::Head);
            guard
        });
        nothing_yet.tracked().set_phase(Phase::Idle);
        // The limit is reached: a newcomer closes the oldest head of the busiest address.
        let (first, episode) = connections.admit(Listener::Gateway, IP);
        first.as_ref().unwrap().tracked().set_phase(Phase::Busy);
        assert_eq!(episode, Episode::Started);
        assert!(old_head.tracked().evicted() && old_head.tracked().shed.is_closed());
        assert!(!new_head.tracked().shed.is_closed());
        // Then the next oldest connection that sent nothing worth keeping, heads and silent
        // ones alike, before the kept-alive one of the quieter address.
        let mut newcomers = vec![first.unwrap()];
        for next in [&new_head, &nothing_yet, &kept_alive] {
            newcomers.push(busy(&connections, Listener::Gateway, IP).unwrap());
            assert!(next.tracked().evicted());
        }
        // Requests in progress and responses being written are never closed: with nothing left
        // to close, 503.
        assert_eq!(
            connections.admit(Listener::Gateway, IP).0.unwrap_err(),
            Refusal::Global
        );
        assert!(busy_ones.iter().all(|guard| !guard.tracked().evicted()));
        assert!(!streaming.tracked().evicted());
    }

    #[test]
    fn eviction_never_lets_more_than_the_slack_past_the_limit() {
        let connections = registry(40, 100);
        let mut held: Vec<_> = (0..200)
            .map_while(|_| connections.admit(Listener::Gateway, IP).0.ok())
            .collect();
        // None of the evicted ones has closed yet.
        assert_eq!(held.len(), 40 - PROBE_RESERVE + EVICTION_SLACK);
        assert!(connections.admit(Listener::Gateway, IP).0.is_err());
        // Once they close, room is made again.
        held.retain(|guard| !guard.tracked().evicted());
        assert!(connections.admit(Listener::Gateway, IP).0.is_ok());
    }
}
