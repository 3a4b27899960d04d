// The Lua scripts that make each bus step atomic in Redis. Keys of one room share the
// hash tag {room}, so a cluster would keep them on one node:
//
//   chatgw:{room}:seq      INCR counter: the room's last seq
//   chatgw:{room}:epoch    random string, created on first use (a lost seq key means a
//                          lost epoch key too, so the sequence restarts with a new epoch)
//   chatgw:{room}:stream   capped stream of the last messages: fields s, e, f, t, ts
//   chatgw:{room}:members  hash: worker id -> members that worker has in the room
//   chatgw:alive:{worker}  expiring key each worker refreshes; members of workers whose
//                          key expired (a dead gateway) are not counted and are removed
//   channel chatgw:{room}  live messages: "seq\nepoch\nts\nfrom\ntext"

enum RedisScripts {
    /// KEYS: seq, epoch, stream, channel. ARGV: from, text, max messages, max age ms,
    /// epoch candidate, key lifetime s. Returns {seq, epoch, ts}.
    static let publish = """
        local epoch = redis.call('GET', KEYS[2])
        if not epoch then epoch = ARGV[5]; redis.call('SET', KEYS[2], epoch) end
        local seq = redis.call('INCR', KEYS[1])
        local now = redis.call('TIME')
        local ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
        redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[3], '*', 's', seq, 'e', epoch, 'f', ARGV[1], 't', ARGV[2], 'ts', ts)
        redis.call('XTRIM', KEYS[3], 'MINID', ts - tonumber(ARGV[4]))
        for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
        redis.call('PUBLISH', KEYS[4], seq .. '\\n' .. epoch .. '\\n' .. ts .. '\\n' .. ARGV[1] .. '\\n' .. ARGV[2])
        return {seq, epoch, ts}
        """

    /// KEYS: seq, epoch, stream, members. ARGV: epoch candidate, worker id, member delta,
    /// max messages, key lifetime s, max age ms. Returns {epoch, seq, members, newest
    /// entries first (none older than the max age)}.
    static let join = """
        local epoch = redis.call('GET', KEYS[2])
        if not epoch then
          epoch = ARGV[1]
          redis.call('SET', KEYS[2], epoch)
          redis.call('EXPIRE', KEYS[2], ARGV[5])
        end
        local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
        local delta = tonumber(ARGV[3])
        if delta ~= 0 then
          redis.call('HINCRBY', KEYS[4], ARGV[2], delta)
          redis.call('EXPIRE', KEYS[4], ARGV[5])
        end
        local members = 0
        local fields = redis.call('HGETALL', KEYS[4])
        for i = 1, #fields, 2 do
          local count = tonumber(fields[i + 1])
          if count <= 0 or redis.call('EXISTS', 'chatgw:alive:' .. fields[i]) == 0 then
            redis.call('HDEL', KEYS[4], fields[i])
          else
            members = members + count
          end
        end
        local now = redis.call('TIME')
        local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[6])
        local entries = redis.call('XREVRANGE', KEYS[3], '+', math.max(0, oldest) .. '-0', 'COUNT', ARGV[4])
        return {epoch, seq, members, entries}
        """
}
