-- Trailing metadata that REST callers should see as response headers.
--
-- Placed AFTER the transcoder in the filter chain, so on the response path it sees the server's
-- gRPC reply before the transcoder does. The transcoder drops a unary reply's trailers, so the
-- ones REST callers need are copied into the response headers here, while those have not yet
-- gone out (body() waits for the whole reply; the transcoder buffers it anyway).
-- `x-embedd-truncated-inputs`: how many inputs were cut to the model's limit.
-- `x-embedd-cache`: "hits=H misses=M", the vector cache's answer (calls that looked it up).
-- Native gRPC calls through the same listener are left alone (they get the trailers).

local NAMESPACE = "embedd"
local COPIED = {"x-embedd-truncated-inputs", "x-embedd-cache"}

function envoy_on_response(response_handle)
  local metadata = response_handle:streamInfo():dynamicMetadata():get(NAMESPACE) or {}
  if metadata["native_grpc"] then
    return
  end
  if response_handle:headers():get("grpc-status") ~= nil then
    return  -- trailers-only: an error, whose body the error filter makes
  end
  response_handle:body()
  local trailers = response_handle:trailers()
  if trailers == nil then
    return
  end
  -- A header handle taken before body() is no longer valid after it: take it again.
  local headers = response_handle:headers()
  for _, name in ipairs(COPIED) do
    local value = trailers:get(name)
    if value ~= nil then
      headers:replace(name, value)
    end
  end
end
