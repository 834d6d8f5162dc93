-- wrk -s bench/users.lua: every request carries `x-user-id: user-<n>`, n = 1..1000 round robin,
-- so a flag's canary gets its share of units (the bench's rows with `users=True`).
-- The requests are formatted once in init(); request() only picks the next one.
local requests = {}
local next_index = 0

function init(args)
   for n = 1, 1000 do
      requests[n] = wrk.format(nil, nil, { ["x-user-id"] = "user-" .. n })
   end
end

function request()
   next_index = next_index % #requests + 1
   return requests[next_index]
end
