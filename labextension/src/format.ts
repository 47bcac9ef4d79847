/**
 * Pure helpers of the extension: the shape of the server's sandbox kernel report
 * (GET /api/sandbox/kernels/{id}) and its human forms. Used by index.ts only.
 */

/** The limits, ceilings and usage figures of one sandbox kernel, as the server sends them. */
export interface ILimits {
  memory: number | null;
  cpus: number | null;
  pids: number | null;
}

export interface IUsage {
  memory_current: number | null;
  memory_peak: number | null;
  cpu_usage_us: number | null;
  pids_current: number | null;
  oom_kills: number;
  pids_limit_hits: number;
}

/** Why the kernel's last process ended (what the provisioner records for a death). */
export interface IExit {
  reason: string;
  oom_killed: boolean;
  asked?: string | null;
  memory_limit?: number | null;
  memory_peak?: number | null;
  [key: string]: unknown;
}

export interface IKernelReport {
  kernel_id: string;
  kernelspec: string;
  display_name: string;
  image: string;
  image_digest: string | null;
  state: 'running' | 'dead' | 'starting';
  limits: ILimits;
  ceilings: ILimits;
  usage: IUsage | null;
  limits_enforced: boolean;
  last_exit: IExit | null;
  notebook_folder_writable: boolean | null;
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

/**
 * A byte count in binary units, as the server's units.format_size writes it:
 * 536870912 -> '512 MiB', 1610612736 -> '1.5 GiB'; null -> 'unlimited'.
 */
export function formatSize(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined) {
    return 'unlimited';
  }
  let n = bytes;
  for (const unit of UNITS) {
    if (Math.abs(n) < 1024 || unit === 'TiB') {
      if (unit === 'B') {
        return `${Math.trunc(n)} B`;
      }
      const text = n.toFixed(1).replace(/\.0$/, '');
      return `${text} ${unit}`;
    }
    n /= 1024;
  }
  return `${bytes} B`;
}

/** A CPU cap: 1 -> '1 CPU', 1.5 -> '1.5 CPUs'; null -> 'unlimited'. */
export function formatCpus(cpus: number | null | undefined): string {
  if (cpus === null || cpus === undefined) {
    return 'unlimited';
  }
  const text = Number.isInteger(cpus) ? `${cpus}` : cpus.toFixed(2).replace(/0+$/, '');
  return `${text} ${cpus === 1 ? 'CPU' : 'CPUs'}`;
}

/**
 * The memory the "Restart with ..." action of the death dialog offers after an out-of-memory
 * death: twice the limit, or the ceiling when that is lower; null when the limit is unknown
 * or the ceiling leaves no room above it.
 */
export function biggerMemory(report: IKernelReport): number | null {
  const limit = report.limits.memory ?? report.last_exit?.memory_limit ?? null;
  if (limit === null || limit <= 0) {
    return null;
  }
  const ceiling = report.ceilings.memory;
  const wanted = ceiling === null ? limit * 2 : Math.min(limit * 2, ceiling);
  return wanted > limit ? wanted : null;
}

/**
 * CPU use between two readings of cpu_usage_us, in percent of one CPU; null when either is
 * missing or the time between them is zero.
 */
export function cpuPercent(
  before: { us: number | null; at: number } | null,
  now: { us: number | null; at: number }
): number | null {
  if (before === null || before.us === null || now.us === null || now.at <= before.at) {
    return null;
  }
  const wallUs = (now.at - before.at) * 1000;
  return Math.max(0, ((now.us - before.us) / wallUs) * 100);
}

/** The status bar text: memory used / limit, CPU and image. */
export function statusText(report: IKernelReport, cpu: number | null): string {
  const parts: string[] = [];
  if (report.state !== 'running' || report.usage === null) {
    parts.push(report.state === 'dead' ? 'stopped' : report.state);
    parts.push(`limit ${formatSize(report.limits.memory)}`);
  } else {
    parts.push(
      `${formatSize(report.usage.memory_current)} / ${formatSize(report.limits.memory)}`
    );
    const share = cpu === null ? '…' : `${cpu.toFixed(0)}%`;
    parts.push(`CPU ${share} of ${formatCpus(report.limits.cpus)}`);
  }
  parts.push(report.image);
  return parts.join(' · ');
}

/** The rows of the full report dialog: [label, value]. */
export function reportRows(report: IKernelReport): [string, string][] {
  const u = report.usage;
  const rows: [string, string][] = [
    ['Kernel', `${report.display_name} (${report.kernelspec}, ${report.kernel_id})`],
    ['State', report.state],
    ['Image', report.image_digest ? `${report.image} (${report.image_digest})` : report.image],
    [
      'Memory',
      u === null
        ? `limit ${formatSize(report.limits.memory)}`
        : `${formatSize(u.memory_current)} used of ${formatSize(report.limits.memory)}` +
          ` (peak ${formatSize(u.memory_peak)})`
    ],
    ['Memory ceiling', formatSize(report.ceilings.memory)],
    [
      'CPU',
      (u === null || u.cpu_usage_us === null
        ? ''
        : `${(u.cpu_usage_us / 1e6).toFixed(1)} s used; `) +
        `limit ${formatCpus(report.limits.cpus)}, ceiling ${formatCpus(report.ceilings.cpus)}`
    ],
    [
      'Processes',
      (u === null || u.pids_current === null ? '' : `${u.pids_current} of `) +
        `${report.limits.pids ?? 'unlimited'} (ceiling ${report.ceilings.pids ?? 'unlimited'})`
    ],
    [
      'Cap hits',
      u === null
        ? 'unknown (not running)'
        : `${u.oom_kills} out-of-memory kill(s), ${u.pids_limit_hits} refused fork(s)`
    ],
    ['Limits enforced', report.limits_enforced ? 'yes' : 'no (this host cannot enforce them)'],
    [
      'Notebook folder',
      report.notebook_folder_writable === null
        ? 'unknown'
        : report.notebook_folder_writable
          ? 'writable'
          : 'read-only for the kernel'
    ],
    ['Last exit', report.last_exit ? report.last_exit.reason : 'none']
  ];
  return rows;
}
