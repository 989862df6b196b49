//! Member colors: a fixed palette and the rule that picks a user's color in a room.
//!
//! The rule (the Redis store runs the same rule in Lua, see `redis.rs`):
//! 1. a user already present (another tab) keeps the color they have;
//! 2. otherwise the color the user had in this room before (remembered for a day)
//!    if no other present user holds it;
//! 3. otherwise the first palette color no present user holds;
//! 4. otherwise (more users than colors) the remembered color, or one picked by a
//!    hash of the user, so it is at least stable.
//!
//! Distinct colors win over remembered ones: a returning user whose color was handed
//! to someone else while they were away gets a free one (and keeps that from then on).

/// Distinct, readable on light and dark backgrounds.
pub const PALETTE: [&str; 12] = [
    "#E5484D", // red
    "#0090FF", // blue
    "#46A758", // green
    "#F76B15", // orange
    "#6E56CF", // violet
    "#12A594", // teal
    "#D6409F", // pink
    "#FFC53D", // amber
    "#3E63DD", // indigo
    "#00A2C7", // cyan
    "#A18072", // brown
    "#AB4ABA", // plum
];

/// A stable hash of a user id: `h = h * 31 + byte (mod 2^32)`, chosen because Lua 5.1's
/// doubles compute it exactly.
pub fn user_hash(user: &str) -> u32 {
    user.bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
}

/// The color for `user`, absent from the room, given the color remembered for them
/// there and which colors present users hold (rules 2–4 above).
pub fn choose(user: &str, remembered: Option<&str>, held: impl Fn(&str) -> bool) -> String {
    if let Some(color) = remembered.filter(|c| !held(c)) {
        return color.to_string();
    }
    if let Some(free) = PALETTE.iter().find(|c| !held(c)) {
        return free.to_string();
    }
    match remembered {
        Some(color) => color.to_string(),
        None => hashed(user).to_string(),
    }
}

/// The palette color for `user` when every color is taken.
pub fn hashed(user: &str) -> &'static str {
    PALETTE[user_hash(user) as usize % PALETTE.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_then_first_free_then_hashed() {
        assert_eq!(choose("ada", Some("#46A758"), |_| false), "#46A758");
        assert_eq!(
            choose("ada", Some("#46A758"), |c| c == "#46A758"),
            PALETTE[0]
        );
        assert_eq!(choose("ada", None, |c| c == PALETTE[0]), PALETTE[1]);
        assert_eq!(choose("ada", Some("#46A758"), |_| true), "#46A758");
        assert_eq!(choose("ada", None, |_| true), hashed("ada"));
    }

    #[test]
    fn hash_matches_the_lua_arithmetic() {
        // ((97 * 31) + 100) * 31 + 97 = 96414 for "ada"
        assert_eq!(user_hash("ada"), 96414);
        // Wraps at 2^32 like the Lua `% 4294967296`.
        let long = "z".repeat(40);
        let mut h: u64 = 0;
        for b in long.bytes() {
            h = (h * 31 + u64::from(b)) % 4_294_967_296;
        }
        assert_eq!(u64::from(user_hash(&long)), h);
    }
}
