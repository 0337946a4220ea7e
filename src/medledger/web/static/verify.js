// medledger: check audit entries in the browser, against the header the validators signed.
//
// For each row: SHA-256(0x00 ‖ leaf) must lead, through the RFC 6962/9162 inclusion proof, to
// the audit root; the leaf (a MessagePack AuditEntry) must say what the row says. Once per
// page: SHA-256("medledger/app-hash/v1\0" ‖ state_root ‖ audit_root ‖ u64be(size)) must be the
// app hash in the header of the next block; that header must hash (CometBFT's Merkle root of
// its protobuf-encoded fields) to the block id the commit signs; the validator set must hash
// to the header's validators_hash; and validators with more than 2/3 of the voting power must
// have signed the canonical precommit (Ed25519). Ports of medledger.ledger.merkle and
// medledger.client.lightclient; WebCrypto does the hashing and signature checks.
"use strict";

const MedledgerVerify = (() => {
  const enc = new TextEncoder();
  const subtle = () => {
    const s = globalThis.crypto && globalThis.crypto.subtle;
    if (!s) throw new Error("this browser offers no WebCrypto here (the portal must be served over https or from localhost)");
    return s;
  };

  // --- bytes ------------------------------------------------------------------------------
  function concat(...parts) {
    const total = parts.reduce((n, p) => n + p.length, 0);
    const out = new Uint8Array(total);
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }
  function fromHex(text) {
    if (typeof text !== "string" || !/^([0-9a-fA-F]{2})*$/.test(text)) throw new Error(`not hex: ${text}`);
    const out = new Uint8Array(text.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = parseInt(text.substr(2 * i, 2), 16);
    return out;
  }
  function toHex(bytes) {
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }
  function fromBase64(text) {
    const raw = atob(text);
    const out = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }
  function equal(a, b) {
    if (a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
    return true;
  }
  async function sha256(bytes) {
    return new Uint8Array(await subtle().digest("SHA-256", bytes));
  }
  function u64be(n) {
    const out = new Uint8Array(8);
    let v = BigInt(n);
    for (let i = 7; i >= 0; i--) { out[i] = Number(v & 0xffn); v >>= 8n; }
    return out;
  }

  // --- RFC 6962 / 9162 ----------------------------------------------------------------------
  const leafHash = (data) => sha256(concat(Uint8Array.of(0), data));
  const nodeHash = (l, r) => sha256(concat(Uint8Array.of(1), l, r));

  async function verifyInclusion(leaf, index, size, proof, root) {
    if (!(index >= 0 && index < size)) return false;
    let fn = BigInt(index), sn = BigInt(size - 1);
    let r = leaf;
    for (const p of proof) {
      if (p.length !== 32) return false;
      if (sn === 0n) return false;
      if ((fn & 1n) === 1n || fn === sn) {
        r = await nodeHash(p, r);
        while (fn !== 0n && (fn & 1n) === 0n) { fn >>= 1n; sn >>= 1n; }
      } else {
        r = await nodeHash(r, p);
      }
      fn >>= 1n; sn >>= 1n;
    }
    return sn === 0n && equal(r, root);
  }

  async function merkleRoot(items) {
    if (items.length === 0) return sha256(new Uint8Array(0));
    if (items.length === 1) return leafHash(items[0]);
    let split = 1;
    while (split * 2 < items.length) split *= 2;
    return nodeHash(await merkleRoot(items.slice(0, split)), await merkleRoot(items.slice(split)));
  }

  // --- protobuf (only what CometBFT's header, validator set and votes use) -----------------
  function uvarint(value) {
    let v = BigInt(value);
    if (v < 0n) v += 1n << 64n; // int64 negatives as two's complement, as protobuf does
    const out = [];
    while (v >= 0x80n) { out.push(Number((v & 0x7fn) | 0x80n)); v >>= 7n; }
    out.push(Number(v));
    return Uint8Array.from(out);
  }
  const key = (field, wire) => uvarint((field << 3) | wire);
  const pbVarint = (field, value) => (BigInt(value) === 0n ? new Uint8Array(0) : concat(key(field, 0), uvarint(value)));
  const pbBytes = (field, bytes) => (bytes.length === 0 ? new Uint8Array(0) : concat(key(field, 2), uvarint(bytes.length), bytes));
  const pbString = (field, text) => pbBytes(field, enc.encode(text));
  // A non-nullable (gogoproto) embedded message: encoded even when empty.
  const pbMessage = (field, bytes) => concat(key(field, 2), uvarint(bytes.length), bytes);
  function pbSfixed64(field, value) {
    let v = BigInt(value);
    if (v === 0n) return new Uint8Array(0);
    if (v < 0n) v += 1n << 64n;
    const out = new Uint8Array(8);
    for (let i = 0; i < 8; i++) { out[i] = Number(v & 0xffn); v >>= 8n; }
    return concat(key(field, 1), out);
  }

  // RFC 3339 with up to nanoseconds -> google.protobuf.Timestamp {seconds, nanos}, exactly.
  function timestamp(text) {
    const m = /^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$/.exec(text);
    if (!m) throw new Error(`invalid RFC 3339 time ${text}`);
    let seconds = BigInt(Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +m[6]) / 1000);
    if (m[9]) {
      const offset = BigInt(+m[10] * 3600 + +m[11] * 60);
      seconds += m[9] === "+" ? -offset : offset;
    }
    const nanos = BigInt((m[7] || "").padEnd(9, "0"));
    return concat(pbVarint(1, seconds), pbVarint(2, nanos));
  }

  function blockId(json) {
    const parts = concat(pbVarint(1, json.parts.total), pbBytes(2, fromHex(json.parts.hash)));
    return concat(pbBytes(1, fromHex(json.hash)), pbMessage(2, parts));
  }

  async function headerHash(h) {
    const leaves = [
      concat(pbVarint(1, h.version.block), pbVarint(2, h.version.app || 0)),
      pbString(1, h.chain_id),
      pbVarint(1, h.height),
      timestamp(h.time),
      blockId(h.last_block_id),
    ];
    for (const name of ["last_commit_hash", "data_hash", "validators_hash", "next_validators_hash",
      "consensus_hash", "app_hash", "last_results_hash", "evidence_hash", "proposer_address"]) {
      leaves.push(pbBytes(1, fromHex(h[name])));
    }
    return merkleRoot(leaves);
  }

  async function validatorSetHash(validators) {
    return merkleRoot(validators.map((v) => concat(pbMessage(1, pbBytes(1, v.pubKey)), pbVarint(2, v.power))));
  }

  function voteSignBytes(chainId, height, round, id, time) {
    const isZero = !id.hash && !id.parts.total && !id.parts.hash;
    const canonicalId = isZero ? new Uint8Array(0) : pbMessage(4, blockId(id));
    const body = concat(
      pbVarint(1, 2), // SIGNED_MSG_TYPE_PRECOMMIT
      pbSfixed64(2, height),
      pbSfixed64(3, round),
      canonicalId,
      pbMessage(5, timestamp(time)),
      pbString(6, chainId),
    );
    return concat(uvarint(body.length), body);
  }

  async function ed25519Verify(pub, signature, message) {
    const k = await subtle().importKey("raw", pub, { name: "Ed25519" }, false, ["verify"]);
    return subtle().verify({ name: "Ed25519" }, k, signature, message);
  }

  // --- the signed header ---------------------------------------------------------------------
  async function checkHeader(chainId, commitDoc, validatorsDoc) {
    const signed = commitDoc.signed_header;
    const header = signed.header, commit = signed.commit;
    if (header.chain_id !== chainId) throw new Error(`header is for chain ${header.chain_id}, not ${chainId}`);
    if (commit.height !== header.height) throw new Error("the commit is for another height");
    const computed = await headerHash(header);
    if (!equal(computed, fromHex(commit.block_id.hash))) throw new Error("the header does not hash to the block the validators signed");
    const validators = [];
    for (const v of validatorsDoc.validators) {
      if (v.pub_key.type !== "tendermint/PubKeyEd25519") throw new Error(`unsupported key type ${v.pub_key.type}`);
      const pubKey = fromBase64(v.pub_key.value);
      const address = (await sha256(pubKey)).slice(0, 20);
      if (!equal(address, fromHex(v.address))) throw new Error(`validator ${v.address} does not match its key`);
      validators.push({ address, pubKey, power: BigInt(v.voting_power) });
    }
    if (validatorsDoc.total !== undefined && Number(validatorsDoc.total) !== validators.length) throw new Error("incomplete validator set");
    if (!equal(await validatorSetHash(validators), fromHex(header.validators_hash))) throw new Error("the validator set is not the one the header names");
    if (commit.signatures.length !== validators.length) throw new Error("one signature slot per validator expected");
    const total = validators.reduce((n, v) => n + v.power, 0n);
    let signedPower = 0n, signers = 0;
    for (let i = 0; i < validators.length; i++) {
      const sig = commit.signatures[i], v = validators[i];
      if (sig.block_id_flag !== 2) continue; // only COMMIT votes count
      if (!equal(fromHex(sig.validator_address), v.address)) throw new Error(`signature ${i} is not from validator ${i}`);
      const message = voteSignBytes(chainId, BigInt(header.height), BigInt(commit.round), commit.block_id, sig.timestamp);
      if (!(await ed25519Verify(v.pubKey, fromBase64(sig.signature), message))) throw new Error(`bad signature from validator ${toHex(v.address).slice(0, 12)}`);
      signedPower += v.power; signers += 1;
    }
    if (3n * signedPower <= 2n * total) throw new Error(`only ${signedPower}/${total} voting power signed; more than 2/3 is needed`);
    return { header, appHash: fromHex(header.app_hash), signedPower, total, signers, count: validators.length,
      fingerprint: header.validators_hash.slice(0, 16) };
  }

  async function checkAnchor(anchor) {
    const header = await checkHeader(anchor.chain_id, anchor.commit, anchor.validators);
    if (Number(header.header.height) !== anchor.height + 1) throw new Error("the header is not the one after the answer's height");
    const stateRoot = fromBase64(anchor.state_root), auditRoot = fromBase64(anchor.audit_root);
    const appHash = await sha256(concat(enc.encode("medledger/app-hash/v1\0"), stateRoot, auditRoot, u64be(anchor.audit_size)));
    if (!equal(appHash, header.appHash)) throw new Error("the audit root is not the one in the signed app hash");
    return { ...header, auditRoot, size: anchor.audit_size };
  }

  // --- MessagePack, just enough for an AuditEntry (an array of ints, bytes and strings) --------
  function unpack(bytes) {
    let at = 0;
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const take = (n) => { const out = bytes.subarray(at, at + n); if (out.length !== n) throw new Error("truncated"); at += n; return out; };
    const str = (n) => new TextDecoder("utf-8", { fatal: true }).decode(take(n));
    function item() {
      const b = bytes[at++];
      if (b === undefined) throw new Error("truncated");
      if (b <= 0x7f) return b;
      if (b >= 0xe0) return b - 0x100;
      if ((b & 0xf0) === 0x90) return array(b & 0x0f);
      if ((b & 0xe0) === 0xa0) return str(b & 0x1f);
      switch (b) {
        case 0xc0: return null;
        case 0xc2: return false;
        case 0xc3: return true;
        case 0xc4: return take(bytes[at++]).slice();
        case 0xc5: { const n = view.getUint16(at); at += 2; return take(n).slice(); }
        case 0xc6: { const n = view.getUint32(at); at += 4; return take(n).slice(); }
        case 0xcc: return bytes[at++];
        case 0xcd: { const v = view.getUint16(at); at += 2; return v; }
        case 0xce: { const v = view.getUint32(at); at += 4; return v; }
        case 0xcf: { const v = view.getBigUint64(at); at += 8; return Number(v); }
        case 0xd0: { const v = view.getInt8(at); at += 1; return v; }
        case 0xd1: { const v = view.getInt16(at); at += 2; return v; }
        case 0xd2: { const v = view.getInt32(at); at += 4; return v; }
        case 0xd3: { const v = view.getBigInt64(at); at += 8; return Number(v); }
        case 0xd9: return str(bytes[at++]);
        case 0xda: { const n = view.getUint16(at); at += 2; return str(n); }
        case 0xdb: { const n = view.getUint32(at); at += 4; return str(n); }
        case 0xdc: { const n = view.getUint16(at); at += 2; return array(n); }
        case 0xdd: { const n = view.getUint32(at); at += 4; return array(n); }
        default: throw new Error(`unexpected MessagePack byte 0x${b.toString(16)}`);
      }
    }
    function array(n) { const out = []; for (let i = 0; i < n; i++) out.push(item()); return out; }
    const value = item();
    if (at !== bytes.length) throw new Error("trailing bytes");
    return value;
  }

  function auditEntry(leaf) {
    const e = unpack(leaf);
    if (!Array.isArray(e) || e.length !== 8) throw new Error("the leaf is not an audit entry");
    const [height, index, txHash, type, sender, code, log, subject] = e;
    return { height, index, tx: toHex(txHash), type, sender, code, log, subject };
  }

  // --- one entry -------------------------------------------------------------------------------
  // `row`: {index, height, leaf (base64), proof (base64, comma-separated), tx, type, sender, code}
  async function checkEntry(row, anchor) {
    const leaf = fromBase64(row.leaf);
    const proof = row.proof ? row.proof.split(",").map(fromBase64) : [];
    const included = await verifyInclusion(await leafHash(leaf), Number(row.index), anchor.size, proof, anchor.auditRoot);
    if (!included) throw new Error("its inclusion proof does not lead to the signed audit root");
    const entry = auditEntry(leaf);
    if (entry.tx !== row.tx || entry.type !== row.type || entry.sender !== row.sender
      || String(entry.code) !== String(row.code) || String(entry.height) !== String(row.height)) {
      throw new Error("the row does not say what its proven audit entry says");
    }
    return entry;
  }

  // --- the page ----------------------------------------------------------------------------------
  function setStatus(el, state, text) {
    el.dataset.state = state;
    el.textContent = text;
  }

  async function checkPage(doc) {
    const anchorEl = doc.getElementById("proof-anchor");
    const summary = doc.getElementById("proof-summary");
    if (!anchorEl) return;
    const rows = Array.from(doc.querySelectorAll(".proof-row"));
    for (const row of rows) setStatus(row.querySelector(".proof-status"), "checking", "checking…");
    let anchor;
    try {
      anchor = await checkAnchor(JSON.parse(anchorEl.textContent));
    } catch (err) {
      for (const row of rows) setStatus(row.querySelector(".proof-status"), "bad", `✗ ${err.message}`);
      if (summary) setStatus(summary, "bad", `✗ The signed header does not verify: ${err.message}`);
      return;
    }
    let good = 0;
    for (const row of rows) {
      const status = row.querySelector(".proof-status");
      try {
        await checkEntry(row.dataset, anchor);
        good += 1;
        setStatus(status, "ok", `✓ in the audit log signed at block ${anchor.header.height}`);
      } catch (err) {
        setStatus(status, "bad", `✗ ${err.message}`);
      }
    }
    const power = `${anchor.signedPower}/${anchor.total} voting power (${anchor.signers} of ${anchor.count} validators, set ${anchor.fingerprint}…)`;
    if (summary) {
      if (good === rows.length) {
        setStatus(summary, "ok", `✓ All ${rows.length} entries verified in this browser against block ${anchor.header.height}, signed by ${power}.`);
      } else {
        setStatus(summary, "bad", `✗ ${rows.length - good} of ${rows.length} entries failed their proof. The header of block ${anchor.header.height} is signed by ${power}.`);
      }
    }
  }

  return { checkPage, checkAnchor, checkEntry, checkHeader, headerHash, voteSignBytes,
    validatorSetHash, verifyInclusion, merkleRoot, auditEntry, fromHex, toHex, fromBase64 };
})();

if (typeof document !== "undefined") {
  const start = () => {
    MedledgerVerify.checkPage(document);
    const again = document.getElementById("verify-again");
    if (again) again.addEventListener("click", () => MedledgerVerify.checkPage(document));
  };
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
}
if (typeof module !== "undefined") module.exports = MedledgerVerify;
