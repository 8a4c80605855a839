//! Which members this agent keeps a connection to: every one while the
//! cluster is small, a bounded set above `full_mesh_max` members (the
//! bounded design of proto-notes/membership.md, "Membership at scale"): its
//! nearest ring neighbours on each side (membership::ring, so every host is
//! watched by the hosts next to it, chosen by nobody) and a few random
//! members (so gossip crosses the ring in a few hops). Sans-IO: the task
//! feeds it the live members and hands the result to the network, which
//! opens and closes connections, and to the detector, which watches them.

use std::collections::BTreeSet;

use libp2p::PeerId;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::ring::ring_neighbours;

/// Default of the `full_mesh_max` key: a fleet of 20 hosts stays a full
/// mesh (about 3 KB/s per host idle; 145 B/s per other member).
pub const FULL_MESH_MAX: usize = 24;
/// Ring neighbours linked on each side.
pub const RING_PER_SIDE: usize = 4;
/// Random members linked besides the ring neighbours.
pub const RANDOM_LINKS: usize = 4;

/// The link choice of one agent.
pub struct Links {
    /// Above this many live members (this agent included), links are
    /// bounded; at or below it, every member is one.
    full_mesh_max: usize,
    per_side: usize,
    random_links: usize,
    /// The random links chosen so far: kept while they live, so the set
    /// does not churn at every membership change.
    random: Vec<PeerId>,
    rng: StdRng,
    /// Whether the last choice was bounded.
    bounded: bool,
}

/// Members below `full_mesh_max` before bounded links turn back into a
/// full mesh.
pub const HYSTERESIS: usize = 2;

impl Links {
    /// `per_side` ring neighbours on each side and `random_links` random
    /// members above `full_mesh_max` live members.
    pub fn new(full_mesh_max: usize, per_side: usize, random_links: usize, seed: u64) -> Self {
        Links {
            full_mesh_max,
            per_side,
            random_links,
            random: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            bounded: false,
        }
    }

    /// The links of `me` among `live` (alive or suspect members, `me` left
    /// out or not): `None` while the cluster is at most `full_mesh_max`
    /// (every member is a link), else its ring neighbours and random
    /// members. Once bounded, the links stay bounded until the cluster is
    /// [`HYSTERESIS`] members below the limit, so that a cluster at the
    /// limit does not switch at every death and return. A random link in
    /// `unreachable` (one this agent has not been able to open for a
    /// while) is replaced; ring neighbours are kept, since they are the
    /// ones that watch.
    pub fn choose(
        &mut self,
        me: &PeerId,
        live: &[PeerId],
        unreachable: &BTreeSet<PeerId>,
    ) -> Option<BTreeSet<PeerId>> {
        let others: BTreeSet<PeerId> = live.iter().filter(|p| *p != me).copied().collect();
        let limit = if self.bounded {
            self.full_mesh_max.saturating_sub(HYSTERESIS)
        } else {
            self.full_mesh_max
        };
        if others.len() < limit {
            self.random.clear();
            self.bounded = false;
            return None;
        }
        self.bounded = true;
        let mut pool: Vec<PeerId> = others.iter().copied().collect();
        pool.push(*me);
        let mut links: BTreeSet<PeerId> = ring_neighbours(me, &pool, self.per_side)
            .into_iter()
            .collect();
        // Random links that are still live and not ring neighbours now.
        self.random
            .retain(|p| others.contains(p) && !links.contains(p) && !unreachable.contains(p));
        if self.random.len() < self.random_links {
            let mut rest: Vec<PeerId> = others
                .iter()
                .filter(|p| {
                    !links.contains(p) && !self.random.contains(p) && !unreachable.contains(p)
                })
                .copied()
                .collect();
            rest.shuffle(&mut self.rng);
            let need = self.random_links - self.random.len();
            self.random.extend(rest.into_iter().take(need));
        }
        links.extend(self.random.iter().copied());
        Some(links)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::ring::ring_key;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    fn none() -> BTreeSet<PeerId> {
        BTreeSet::new()
    }

    /// `l`'s first bounded choice for `me` among `all`: its ring
    /// neighbours and its random links.
    fn first_choice(l: &mut Links, me: &PeerId, all: &[PeerId]) -> (BTreeSet<PeerId>, Vec<PeerId>) {
        let links = l.choose(me, all, &none()).expect("bounded");
        let ring: BTreeSet<PeerId> = ring_neighbours(me, all, RING_PER_SIDE)
            .into_iter()
            .collect();
        let random = links.difference(&ring).copied().collect();
        (ring, random)
    }

    #[test]
    fn a_small_cluster_links_everyone() {
        let all = peers(24);
        let mut l = Links::new(24, RING_PER_SIDE, RANDOM_LINKS, 1);
        // 23 others and this agent: 24 members, at the limit.
        assert_eq!(l.choose(&all[0], &all, &none()), None);
        let more = [all.clone(), peers(1)].concat();
        assert!(l.choose(&all[0], &more, &none()).is_some());
        // Back at the limit, and one below: still bounded; two below: not.
        assert!(l.choose(&all[0], &all, &none()).is_some());
        assert!(l.choose(&all[0], &all[..23], &none()).is_some());
        assert_eq!(l.choose(&all[0], &all[..22], &none()), None);
    }

    #[test]
    fn an_unreachable_random_link_is_replaced_and_ring_neighbours_kept() {
        let all = peers(60);
        let me = all[0];
        let mut l = Links::new(24, RING_PER_SIDE, RANDOM_LINKS, 5);
        let (ring, random) = first_choice(&mut l, &me, &all);
        let bad: BTreeSet<PeerId> = [random[0], *ring.iter().next().unwrap()]
            .into_iter()
            .collect();
        let after = l.choose(&me, &all, &bad).expect("bounded");
        assert!(
            !after.contains(&random[0]),
            "the unreachable random link stayed"
        );
        assert!(ring.is_subset(&after), "a ring neighbour was dropped");
        assert_eq!(after.len(), 2 * RING_PER_SIDE + RANDOM_LINKS);
    }

    #[test]
    fn a_large_cluster_links_ring_neighbours_and_a_few_random_members() {
        let all = peers(100);
        let me = all[7];
        let mut l = Links::new(24, RING_PER_SIDE, RANDOM_LINKS, 1);
        let links = l.choose(&me, &all, &none()).expect("bounded");
        assert_eq!(links.len(), 2 * RING_PER_SIDE + RANDOM_LINKS);
        assert!(!links.contains(&me));
        // The ring neighbours, computed from the ring order here.
        let mut ring: Vec<PeerId> = all.clone();
        ring.sort_by_key(ring_key);
        let at = ring.iter().position(|p| *p == me).unwrap();
        for d in 1..=RING_PER_SIDE {
            assert!(links.contains(&ring[(at + d) % 100]), "successor {d}");
            assert!(
                links.contains(&ring[(at + 100 - d) % 100]),
                "predecessor {d}"
            );
        }
        // The same members again: the same links (the random ones are kept).
        assert_eq!(l.choose(&me, &all, &none()), Some(links.clone()));
    }

    #[test]
    fn a_dead_random_link_is_replaced_and_the_others_kept() {
        let all = peers(60);
        let me = all[0];
        let mut l = Links::new(24, RING_PER_SIDE, RANDOM_LINKS, 3);
        let (_, random) = first_choice(&mut l, &me, &all);
        assert_eq!(random.len(), RANDOM_LINKS);
        let gone = random[0];
        let live: Vec<PeerId> = all.iter().filter(|p| **p != gone).copied().collect();
        let after = l.choose(&me, &live, &none()).expect("bounded");
        assert_eq!(after.len(), 2 * RING_PER_SIDE + RANDOM_LINKS);
        assert!(!after.contains(&gone));
        for p in &random[1..] {
            assert!(after.contains(p), "a live random link was dropped");
        }
    }
}
