//! The membership ring: every host's place is the SHA-256 of its peer id, so
//! any host can name any member's ring neighbours from the member list
//! alone, with no coordination. The bounded design of proto-notes/
//! membership.md ("Membership at scale") keeps a link to each host's nearest
//! ring neighbours; the detector asks a suspect's ring neighbours to probe it
//! ([`crate::membership::detector::DetectorConfig::helpers_near_target`]),
//! because they are the hosts that hold a connection to it.

use libp2p::PeerId;
use sha2::{Digest, Sha256};

/// A peer's place on the ring.
pub fn ring_key(peer: &PeerId) -> [u8; 32] {
    Sha256::digest(peer.to_bytes()).into()
}

/// Up to `per_side` members of `members` on each side of `target` on the
/// ring (`target` itself left out, duplicates ignored), nearest first,
/// alternating sides: successor, predecessor, next successor, and so on. With
/// fewer than `2 * per_side` other members, each is named once.
pub fn ring_neighbours(target: &PeerId, members: &[PeerId], per_side: usize) -> Vec<PeerId> {
    let mut ring: Vec<([u8; 32], PeerId)> = members
        .iter()
        .filter(|p| *p != target)
        .map(|p| (ring_key(p), *p))
        .collect();
    ring.sort();
    ring.dedup_by(|a, b| a.1 == b.1);
    let n = ring.len();
    if n == 0 || per_side == 0 {
        return Vec::new();
    }
    let key = ring_key(target);
    // Index of the first member after the target's place (wrapping).
    let after = ring.partition_point(|(k, _)| *k < key) % n;
    let mut out = Vec::with_capacity((2 * per_side).min(n));
    for i in 0..per_side.min(n) {
        for p in [ring[(after + i) % n].1, ring[(after + n - 1 - i) % n].1] {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    /// The members in ring order.
    fn sorted(members: &[PeerId]) -> Vec<PeerId> {
        let mut v: Vec<_> = members.iter().map(|p| (ring_key(p), *p)).collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }

    #[test]
    fn names_the_nearest_on_each_side() {
        let all = peers(20);
        let ring = sorted(&all);
        for (i, target) in ring.iter().enumerate() {
            let got = ring_neighbours(target, &all, 2);
            let n = ring.len();
            let want = [
                ring[(i + 1) % n],
                ring[(i + n - 1) % n],
                ring[(i + 2) % n],
                ring[(i + n - 2) % n],
            ];
            assert_eq!(got, want, "target at {i}");
        }
    }

    #[test]
    fn a_target_outside_the_list_gets_the_members_around_its_place() {
        let all = peers(10);
        let outsider = PeerId::random();
        let ring = sorted(&all);
        let key = ring_key(&outsider);
        let after = ring.iter().position(|p| ring_key(p) > key).unwrap_or(0);
        let got = ring_neighbours(&outsider, &all, 1);
        assert_eq!(got, vec![ring[after], ring[(after + 9) % 10]]);
    }

    #[test]
    fn small_rings_name_each_member_once() {
        let all = peers(3);
        let got = ring_neighbours(&all[0], &all, 4);
        assert_eq!(got.len(), 2);
        assert!(got.contains(&all[1]) && got.contains(&all[2]));
        assert!(ring_neighbours(&all[0], &all[..1], 4).is_empty());
        assert!(ring_neighbours(&all[0], &all, 0).is_empty());
    }

    #[test]
    fn the_same_members_give_the_same_neighbours_on_every_host() {
        let all = peers(30);
        let mut shuffled = all.clone();
        shuffled.reverse();
        for t in &all {
            assert_eq!(
                ring_neighbours(t, &all, 3),
                ring_neighbours(t, &shuffled, 3)
            );
        }
    }
}
