/** The real receiver on an in-process stream pair, with the real client (ReceiverConnection) or raw frames. */
import { PassThrough } from 'node:stream';
import { FrameDecoder, encodeControl, encodeData } from '../../lib/protocol/protocol.js';
import { runReceiver, type ReceiverOptions } from '../../lib/replica/receiver.js';
import { ReceiverConnection } from '../../lib/transfer/replica-client.js';

export function receiverOptions(snapsDir: string, extra: Partial<ReceiverOptions> = {}): ReceiverOptions {
  return {
    snapsDir,
    identity: 'hv-test',
    lockTimeoutSec: 2,
    maxSessions: 4,
    busyWaitSec: 0,
    maxUsedPercent: 99,
    ...(process.env.RLOG ? { log: (o: object, m: string) => console.error(m, JSON.stringify(o)) } : {}),
    ...extra,
  };
}

export interface ClientSession {
  conn: ReceiverConnection;
  done: Promise<number>;
  /** control messages the client sent, in order */
  sent: Array<Record<string, unknown>>;
}

export async function clientSession(snapsDir: string, extra: Partial<ReceiverOptions> = {}): Promise<ClientSession> {
  const toReceiver = new PassThrough();
  const fromReceiver = new PassThrough();
  const sent: Array<Record<string, unknown>> = [];
  const dec = new FrameDecoder();
  toReceiver.on('data', (c: Buffer) => {
    for (const f of dec.push(c)) if (f.type === 'control') sent.push(f.message as Record<string, unknown>);
  });
  const done = runReceiver(toReceiver, fromReceiver, receiverOptions(snapsDir, extra)).finally(() => fromReceiver.end());
  const conn = new ReceiverConnection(fromReceiver, toReceiver);
  await conn.hello('hv1', 'test');
  return { conn, done, sent };
}

/** A peer speaking raw control frames: ask() sends one and waits for the reply. */
export function rawPeer(snapsDir: string, extra: Partial<ReceiverOptions> = {}) {
  const toReceiver = new PassThrough();
  const fromReceiver = new PassThrough();
  const done = runReceiver(toReceiver, fromReceiver, receiverOptions(snapsDir, extra)).finally(() => fromReceiver.end());
  const decoder = new FrameDecoder();
  const replies: unknown[] = [];
  const waiting: ((v: unknown) => void)[] = [];
  fromReceiver.on('data', (c: Buffer) => {
    for (const f of decoder.push(c)) {
      if (f.type !== 'control') continue;
      const w = waiting.shift();
      if (w) w(f.message);
      else replies.push(f.message);
    }
  });
  const next = () => (replies.length ? Promise.resolve(replies.shift()) : new Promise<unknown>((r) => waiting.push(r)));
  return {
    done,
    send(msg: object) {
      toReceiver.write(encodeControl(msg));
    },
    data(buf: Buffer) {
      for (const b of encodeData(buf)) toReceiver.write(b);
    },
    raw(buf: Buffer) {
      toReceiver.write(buf);
    },
    async ask(msg: object): Promise<Record<string, unknown>> {
      toReceiver.write(encodeControl(msg));
      return (await next()) as Record<string, unknown>;
    },
    next: async () => (await next()) as Record<string, unknown>,
    cut() {
      toReceiver.end();
    },
  };
}
