-- REST error bodies for the gRPC-JSON transcoder.
--
-- Placed BEFORE the transcoder in the filter chain, so on the response path it sees what the
-- transcoder made of the server's reply. On an error the embedd server attaches the complete
-- HTTP error JSON as trailing metadata `x-http-error-body` (OpenAI's, Ollama's, Cohere's, the
-- rerank routes' or TEI's shape: the one the RPC's service declares),
-- and the HTTP status as `x-http-status`; a unary error is a trailers-only
-- reply, so both arrive here as response headers. This filter turns them into the body.
-- A `retry-after` trailer (rate limits, in whole seconds) stays as the HTTP Retry-After header:
-- only grpc-* and x-http-* headers are removed.
--
-- Native gRPC calls through the same listener are left alone: that is decided from the REQUEST's
-- content-type (an errored REST reply also carries content-type application/grpc).

local NAMESPACE = "embedd"

-- The error shape of each REST path, from the protos: each service declares its routes' shape
-- (embedd.v1.rest). The root is chosen by verb (GET / and HEAD / are Ollama's, POST / TEI's);
-- any other path by the longest claim on it; a path nothing claims speaks DEFAULT_SHAPE.
-- BEGIN GENERATED ROUTES (embedd_server.run.envoy lua, from the protos' embedd.v1.rest options:
-- do not edit).
local DEFAULT_SHAPE = "openai"
local ROOT_SHAPES = {GET = "ollama", HEAD = "ollama", POST = "tei"}
local ROOT_OTHER_SHAPE = "ollama"
-- {prefix, whole, shape}, the longest prefix first. whole: the path itself or one under
-- it (path .. "/..."); else every path that starts with prefix.
local CLAIMS = {
  {"/v1/models/unload", true, "openai"},
  {"/v1/models/load", true, "openai"},
  {"/api/embeddings", true, "ollama"},
  {"/v1/embeddings", true, "openai"},
  {"/embed_sparse", true, "tei"},
  {"/api/version", true, "ollama"},
  {"/invocations", true, "tei"},
  {"/v1/models/", false, "openai"},
  {"/embeddings", true, "openai"},
  {"/similarity", true, "tei"},
  {"/v1/rerank", false, "rerank"},
  {"/v2/rerank", false, "rerank"},
  {"/v1/models", true, "openai"},
  {"/api/embed", true, "ollama"},
  {"/embed_all", true, "tei"},
  {"/api/tags", true, "ollama"},
  {"/api/pull", true, "ollama"},
  {"/api/show", true, "ollama"},
  {"/v2/embed", true, "cohere"},
  {"/tokenize", true, "tei"},
  {"/predict", true, "tei"},
  {"/health", true, "openai"},
  {"/api/ps", true, "ollama"},
  {"/rerank", true, "tei"},
  {"/decode", true, "tei"},
  {"/embed", true, "tei"},
  {"/api/", false, "ollama"},
  {"/info", true, "tei"},
  {"/ping", true, "tei"},
  {"/v2/", false, "cohere"},
}
-- END GENERATED ROUTES

local function shape_of(path, method)
  local bare = path:match("^[^?]*")
  if bare == "/" then return ROOT_SHAPES[method] or ROOT_OTHER_SHAPE end
  for _, claim in ipairs(CLAIMS) do
    local prefix, whole, shape = claim[1], claim[2], claim[3]
    if bare:sub(1, #prefix) == prefix then
      local next_char = bare:sub(#prefix + 1, #prefix + 1)
      if not whole or next_char == "" or next_char == "/" then return shape end
    end
  end
  return DEFAULT_SHAPE
end

-- The most header bytes (names and values) a REST request may carry. Above it the request is
-- refused here with 431, in its API's error shape (the local reply mappers of envoy.yaml.tmpl
-- shape the text this filter answers with). Envoy's own limit, max_request_headers_kb (60 KiB),
-- lies above this one; what it refuses gets the same 431 in OpenAI's shape, as it is refused
-- before any filter knows the route. The gRPC server accepts more than either (rpc/server.py).
local MAX_HEADER_KIB = 32
local MAX_HEADER_BYTES = MAX_HEADER_KIB * 1024
local HEADERS_TOO_LARGE = "Request Header Fields Too Large: the request's headers take more " ..
  "than " .. MAX_HEADER_KIB .. " KiB; send fewer or shorter headers."

local function header_bytes(headers)
  local total = 0
  for name, value in pairs(headers) do
    total = total + #name + #value
  end
  return total
end

function envoy_on_request(request_handle)
  local content_type = request_handle:headers():get("content-type") or ""
  local path = request_handle:headers():get(":path") or ""
  local method = request_handle:headers():get(":method") or ""
  local metadata = request_handle:streamInfo():dynamicMetadata()
  if content_type:sub(1, 16) == "application/grpc" then
    metadata:set(NAMESPACE, "native_grpc", true)
    return
  end
  -- The shape's name as a key (openai, ollama, cohere, rerank, tei): the local reply mappers of
  -- envoy.yaml.tmpl and fallback_body below read it.
  metadata:set(NAMESPACE, shape_of(path, method), true)
  if header_bytes(request_handle:headers()) > MAX_HEADER_BYTES then
    request_handle:respond({[":status"] = "431", ["content-type"] = "text/plain"}, HEADERS_TOO_LARGE)
  end
end

-- grpc-status -> OpenAI error code, for errors that came without a prepared body.
local GRPC_CODES = {
  ["1"] = "cancelled", ["2"] = "internal_error", ["3"] = "invalid_request_error",
  ["4"] = "timeout", ["5"] = "not_found", ["7"] = "permission_denied", ["8"] = "rate_limit_exceeded",
  ["12"] = "not_implemented", ["13"] = "internal_error", ["14"] = "service_unavailable",
  ["16"] = "invalid_api_key",
}

local function json_string(text)
  local escaped = text:gsub('[%c"\\]', function(char)
    if char == '"' then return '\\"' end
    if char == "\\" then return "\\\\" end
    return string.format("\\u%04x", char:byte())
  end)
  return '"' .. escaped .. '"'
end

local function percent_decode(text)
  return (text:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- A body for a gRPC error that carries no x-http-error-body (one not raised by our handlers,
-- e.g. grpcio's own message-size or unimplemented errors). Details stay out of 5xx bodies.
-- Returns the body and the HTTP status.
local function fallback_body(headers, metadata)
  local status = tonumber(headers:get(":status")) or 500
  local message = percent_decode(headers:get("grpc-message") or "")
  local code = GRPC_CODES[headers:get("grpc-status")] or "internal_error"
  if headers:get("grpc-status") == "4" then
    -- A REST caller's own grpc-timeout header ran out: grpcio ends the call without our body.
    status = 504
    code = "timeout"
    message = "The request's deadline (its grpc-timeout header) passed before the server " ..
      "finished; send a longer grpc-timeout, or none."
  elseif headers:get("grpc-status") == "8" then
    -- Our own overload errors carry a body; a bare RESOURCE_EXHAUSTED is grpcio's message-size
    -- limit (max_message_mb), which the transcoder would otherwise report as a misleading 429.
    status = 413
    code = "request_too_large"
    message = "The request or its response is larger than the server's limit (" .. message .. ")."
  elseif status >= 500 or message == "" then
    message = "Internal server error; the details are in the server log."
    if status == 503 then message = "The service is unavailable; retry later." end
  end
  if metadata["ollama"] then
    return '{"error":' .. json_string(message) .. "}", status
  end
  if metadata["rerank"] then  -- Cohere's "message" and Jina's "detail"
    return '{"message":' .. json_string(message) .. ',"detail":' .. json_string(message) .. "}",
      status
  end
  if metadata["tei"] then
    local kind = "Validation"
    if status == 429 then kind = "Overloaded" elseif status == 503 then kind = "Unhealthy"
    elseif status >= 500 then kind = "Backend" end
    return '{"error":' .. json_string(message) .. ',"error_type":"' .. kind .. '"}', status
  end
  if metadata["cohere"] then
    return '{"message":' .. json_string(message) .. "}", status
  end
  local kind = "invalid_request_error"
  if status >= 500 then kind = "server_error" end
  return '{"error":{"message":' .. json_string(message) .. ',"type":"' .. kind ..
    '","param":null,"code":"' .. code .. '"}}', status
end

local function strip_grpc_headers(headers)
  local names = {}
  for name, _ in pairs(headers) do
    if name:sub(1, 5) == "grpc-" or name:sub(1, 7) == "x-http-" then
      names[#names + 1] = name
    end
  end
  for _, name in ipairs(names) do
    headers:remove(name)
  end
end

function envoy_on_response(response_handle)
  local metadata = response_handle:streamInfo():dynamicMetadata():get(NAMESPACE) or {}
  if metadata["native_grpc"] then
    return
  end
  local headers = response_handle:headers()
  local body = headers:get("x-http-error-body")
  local grpc_status = headers:get("grpc-status")
  if body == nil and (grpc_status == nil or grpc_status == "0") then
    strip_grpc_headers(headers)
    return
  end
  local http_status = headers:get("x-http-status")
  if body == nil then
    body, http_status = fallback_body(headers, metadata)
  end
  if http_status ~= nil then
    headers:replace(":status", tostring(http_status))
  end
  strip_grpc_headers(headers)
  headers:replace("content-type", "application/json")
  response_handle:body(true):setBytes(body)
end
