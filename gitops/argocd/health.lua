-- Argo CD health check for wasmfilter.dev/WasmFilter (Argo CD runs it with gopher-lua, Lua 5.1).
-- Install it under resource.customizations.health.wasmfilter.dev_WasmFilter in argocd-cm.
-- It reads the same conditions kstatus (Flux) does:
--   Healthy      Ready=True for the current generation
--   Progressing  no status yet, an older generation described, Reconciling=True (working, or
--                retrying a failure that may pass), Ready=Unknown, or proxies still answering
--   Degraded     Stalled=True (needs a change), or Ready=False for any other reason (say, an
--                Envoy refused the module), with the operator's reason and message
hs = {}
local generation = obj.metadata and obj.metadata.generation
local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report"
  return hs
end
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "The operator has not yet acted on generation " .. generation
  return hs
end
local by_type = {}
for _, c in ipairs(status.conditions) do
  by_type[c.type] = c
end
local function say(c)
  return (c.reason or "") .. ": " .. (c.message or "")
end
local stalled, reconciling, ready = by_type["Stalled"], by_type["Reconciling"], by_type["Ready"]
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = say(ready or stalled)
elseif reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = say(reconciling)
elseif ready == nil or ready.status == "Unknown" or ready.reason == "LoadPending" then
  hs.status = "Progressing"
  hs.message = ready and say(ready) or "No Ready condition yet"
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = say(ready)
else
  hs.status = "Degraded"
  hs.message = say(ready)
end
return hs
