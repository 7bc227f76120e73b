//! The fleet tier's Lua scripts, each one round trip that touches the names of one key (one
//! Cluster slot): the claim, the two commits and the lease renewal; their loading on a new
//! connection, and the reading of a claim's answer.

use redis::{Script, Value};
use std::time::Duration;

use super::link::Conn;
use super::{Claim, Hold};

/// A stored token, its fresh marker and the client's cool-downs decide; else the lock is taken.
/// KEYS: token, fresh, proven marker, proven cool-down, unproven cool-down, lock. ARGV: owner,
/// lease ms, whether the pod knows the key proven, whether to look at cool-downs (not after one
/// was found forged), whether to look at the token (not after it did not open). An unproven key
/// obeys both cool-downs, a proven one only the proven one.
pub(super) const CLAIM: &str = r"
local proven = ARGV[3] == '1' or redis.call('EXISTS', KEYS[3]) == 1
local p = proven and 1 or 0
local v = false
if ARGV[5] == '1' then v = redis.call('GET', KEYS[1]) end
if v and redis.call('EXISTS', KEYS[2]) == 1 then
  return {1, v, redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2]), p}
end
if ARGV[4] == '1' then
  local name, which, cd = KEYS[4], 1, redis.call('PTTL', KEYS[4])
  if not proven then
    local ud = redis.call('PTTL', KEYS[5])
    if ud > cd then name, which, cd = KEYS[5], 0, ud end
  end
  if cd > 0 then
    local cv = redis.call('GET', name)
    if v then return {1, v, redis.call('PTTL', KEYS[1]), cd, p, cv, which} end
    return {2, cv, cd, p, which}
  end
end
if redis.call('SET', KEYS[6], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {3, p}
end
return {4, p}
";

/// Stores the sealed token (TTL = serve-until), its fresh marker and the key's proven marker,
/// frees the lock if still ours, and tells the fleet.
pub(super) const COMMIT_TOKEN: &str = r"
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
else
  redis.call('DEL', KEYS[2])
end
redis.call('SET', KEYS[4], '1', 'PX', ARGV[7])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
";

/// Extends the client's cool-down (never shortens it, unless the one there is still the value a
/// claim found forged, ARGV[6]),
/// frees the lock if still ours, and tells the fleet. A hold of 0 only frees the lock.
pub(super) const COMMIT_HOLD: &str = r"
local ms = tonumber(ARGV[2])
if ms > 0 and (redis.call('PTTL', KEYS[1]) < ms
    or (ARGV[6] ~= '' and redis.call('GET', KEYS[1]) == ARGV[6])) then
  redis.call('SET', KEYS[1], ARGV[5], 'PX', ms)
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

/// Extends a lock's lease if it is still ours.
pub(super) const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// The tier's scripts, loaded on every new connection.
pub(super) struct Scripts {
    pub(super) claim: Script,
    pub(super) commit_token: Script,
    pub(super) commit_hold: Script,
    pub(super) renew: Script,
}

impl Scripts {
    /// Loads every script on `conn` (on every primary, in a cluster), all at once: one round
    /// trip on a multiplexed connection.
    pub(super) async fn load(&self, conn: &Conn) -> redis::RedisResult<()> {
        let scripts = [
            &self.claim,
            &self.commit_token,
            &self.commit_hold,
            &self.renew,
        ];
        futures_util::future::try_join_all(scripts.map(|script| {
            let mut conn = conn.clone();
            async move { script.load_async(&mut conn).await }
        }))
        .await
        .map(drop)
    }
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            claim: Script::new(CLAIM),
            commit_token: Script::new(COMMIT_TOKEN),
            commit_hold: Script::new(COMMIT_HOLD),
            renew: Script::new(RENEW),
        }
    }
}

/// A claim script's answer, a lead saying whether the key is proven; `None` if it is not one (a
/// Redis that is not ours).
pub(super) fn parse_claim(value: Value) -> Option<Claim<bool>> {
    let Value::Array(items) = value else {
        return None;
    };
    let int = |i: usize| match items.get(i) {
        Some(Value::Int(n)) => Some(*n),
        _ => None,
    };
    let bytes = |i: usize| match items.get(i) {
        Some(Value::BulkString(b)) => Some(b.clone()),
        _ => None,
    };
    let left = |i: usize| int(i).map(|ms| Duration::from_millis(ms.max(0) as u64));
    match int(0)? {
        1 => {
            let fresh_left = left(3)?;
            let hold = match (bytes(5), int(6)) {
                (Some(value), Some(which)) => Some(Hold {
                    value,
                    ttl: fresh_left,
                    proven: which == 1,
                }),
                _ => None,
            };
            Some(Claim::Token {
                sealed: bytes(1)?,
                serve_left: left(2)?,
                fresh_left,
                hold,
            })
        }
        2 => Some(Claim::Cooldown(Hold {
            value: bytes(1)?,
            ttl: left(2)?,
            proven: int(4)? == 1,
        })),
        3 => Some(Claim::Lead(int(1)? == 1)),
        4 => Some(Claim::Busy),
        _ => None,
    }
}
