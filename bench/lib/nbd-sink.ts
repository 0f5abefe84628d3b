/**
 * Bench only (seed-split.js, piece `export fd -> nbd sink`): what the replica's side would cost if a seed's
 * NBD replies came to it straight from ssh, with the agent out of the data path. It does per byte what the
 * receiver does per byte: reads stdin into lent buffers (lib/replica/stdio.ts), checks every reply against
 * the reads it expects (the agent's own NBD reply parser), hashes the data (XXH64), writes it in 512 KiB
 * batches with O_DIRECT where the filesystem takes it, one write at a time, and fsyncs at the end. No
 * qcow2 layout, ledger or publish: those cost the same either way.
 * Usage: node nbd-sink.js FILE READS READ_BYTES [--no-direct-io]   (prints `bytes digest cpu-seconds` when every read has landed)
 */
import { constants as fsConstants } from 'node:fs';
import fsp from 'node:fs/promises';
import { newDigest } from '../../lib/protocol/digest.js';
import { NBD_CMD_READ, NbdReplyParser } from '../../lib/libvirt/nbd-protocol.js';
import { lentStdin } from '../../lib/replica/stdio.js';
import { openDirect, pageAlignedBuffers } from '../../lib/replica/uploads.js';

const [file, readsArg, readBytesArg, flag] = process.argv.slice(2);
const READS = Number(readsArg);
const READ_BYTES = Number(readBytesArg);
if (!file || !(READS > 0) || !(READ_BYTES > 0) || READ_BYTES % 4096 !== 0) {
  console.error('usage: nbd-sink.js FILE READS READ_BYTES [--no-direct-io] (READ_BYTES a multiple of 4096)');
  process.exit(2);
}
/** buffers for reads whose data is arriving or waiting for their write (QEMU answers at most 16 at once) */
const POOL = 32;

async function main(): Promise<void> {
  const fh = await fsp.open(file!, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_TRUNC, 0o600);
  const direct = flag === '--no-direct-io' ? null : await openDirect(fh);
  const hash = await newDigest('xxh64');
  const parser = new NbdReplyParser(READS * READ_BYTES, new Set());
  for (let i = 0; i < READS; i++) parser.expect(BigInt(i + 1), NBD_CMD_READ, i * READ_BYTES, READ_BYTES);
  const free = pageAlignedBuffers(POOL, READ_BYTES);
  const filling = new Map<bigint, { buf: Buffer; offset: number }>();
  let freed: (() => void) | null = null;
  let writes: Promise<void> = Promise.resolve();
  let landed = 0;
  let bytes = 0;
  const input = lentStdin();
  for await (const chunk of input) {
    for (const ev of parser.push(chunk)) {
      if (ev.kind === 'error') throw new Error(`read ${ev.cookie} failed: errno ${ev.errno}`);
      if (ev.kind !== 'data' && ev.kind !== 'hole' && ev.kind !== 'done') continue;
      let slot = filling.get(ev.cookie);
      if (!slot) {
        while (free.length === 0) await new Promise<void>((r) => (freed = r));
        slot = { buf: free.pop()!, offset: (Number(ev.cookie) - 1) * READ_BYTES };
        filling.set(ev.cookie, slot);
      }
      if (ev.kind === 'data') {
        ev.data.copy(slot.buf, ev.offset - slot.offset);
        hash.update(ev.data);
      } else if (ev.kind === 'hole') {
        slot.buf.fill(0, ev.offset - slot.offset, ev.offset - slot.offset + ev.length);
      } else {
        filling.delete(ev.cookie);
        const { buf, offset } = slot;
        writes = writes.then(async () => {
          await (direct ?? fh).write(buf, 0, READ_BYTES, offset);
          bytes += READ_BYTES;
          free.push(buf);
          const w = freed;
          freed = null;
          w?.();
        });
        landed++;
      }
    }
    if (landed === READS) break;
  }
  await writes;
  await fh.sync();
  await direct?.close();
  await fh.close();
  const cpu = process.cpuUsage();
  process.stdout.write(`${bytes} ${hash.hex()} ${((cpu.user + cpu.system) / 1e6).toFixed(2)}\n`);
  process.exit(landed === READS ? 0 : 1);
}

main().catch((e) => {
  console.error(`nbd-sink: ${(e as Error).message}`);
  process.exit(1);
});
