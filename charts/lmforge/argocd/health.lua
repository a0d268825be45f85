-- Argo CD health check for lmforge.dev/v1alpha1 TrainJob, InferenceService and QuantizeJob.
-- Argo CD sets the global `obj` (the live object) and expects {status=..., message=...}.
--
-- 1. No status or no phase yet: Progressing (the operator has not acted).
-- 2. status.observedGeneration < metadata.generation: Progressing, whatever the phase says: the
--    status describes an older spec, so a sync is only done once the operator has acted on it.
--    Exception: a finished job (Succeeded/Failed never change) keeps its final health; the
--    message says that a spec changed after the end is not acted on.
-- 3. Otherwise status.phase through PHASES below; the message is the phase plus the reason and
--    message of the most recently changed condition.

local PHASES = {
  TrainJob = {
    Pending = "Progressing",
    Running = "Progressing",
    Restarting = "Progressing",
    Succeeded = "Healthy",
    Failed = "Degraded",
    Suspended = "Suspended",
  },
  InferenceService = {
    Pending = "Progressing",
    Loading = "Progressing",
    Ready = "Healthy",
    Degraded = "Degraded",
    ScaledToZero = "Healthy",
    Failed = "Degraded",
  },
  QuantizeJob = {
    Pending = "Progressing",
    Running = "Progressing",
    Succeeded = "Healthy",
    Failed = "Degraded",
  },
}

local FINISHED = { TrainJob = true, QuantizeJob = true }
local TERMINAL = { Succeeded = true, Failed = true }

-- The condition that changed last (RFC 3339 UTC timestamps compare as strings).
local function latest_condition(conditions)
  local found = nil
  for _, condition in ipairs(conditions or {}) do
    if found == nil or (condition.lastTransitionTime or "") > (found.lastTransitionTime or "") then
      found = condition
    end
  end
  return found
end

local function describe(phase, conditions)
  local condition = latest_condition(conditions)
  if condition == nil then
    return phase
  end
  local text = phase .. ": " .. (condition.reason or condition.type or "")
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end

local hs = {}
local status = obj.status
local kind = obj.kind
local phases = PHASES[kind]
if phases == nil then
  hs.status = "Unknown"
  hs.message = "not an lmforge kind: " .. tostring(kind)
  return hs
end
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the lmforge operator to act on the " .. kind
  return hs
end

local generation = obj.metadata.generation or 0
local observed = status.observedGeneration or 0
local finished = FINISHED[kind] and TERMINAL[status.phase]
if observed < generation and not finished then
  hs.status = "Progressing"
  hs.message = "generation " .. generation .. " not yet acted on by the operator (status is for "
    .. observed .. ", phase " .. status.phase .. ")"
  return hs
end

hs.status = phases[status.phase] or "Unknown"
hs.message = describe(status.phase, status.conditions)
if observed < generation then
  hs.message = hs.message .. " (spec changed after the " .. kind .. " finished: not acted on)"
end
return hs
