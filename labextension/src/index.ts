/**
 * sandbox-kernel-lab: what JupyterLab shows of a sandbox kernel.
 *
 * - A status bar item for the active notebook's kernel when it is a sandbox kernel (its
 *   kernelspec uses the sandbox-provisioner): memory used / limit, CPU and image, read from
 *   GET /api/sandbox/kernels/{id} every few seconds while such a kernel is active, nothing
 *   otherwise. A click shows the full report.
 * - When a sandbox kernel dies (status 'dead', 'autorestarting', or a 'restarting' nobody
 *   here asked for), a dialog with the plain reason the server recorded (last_exit) and,
 *   after an out-of-memory death the ceiling leaves room for, "Restart with <more>": PATCH
 *   the kernel's memory, then restart it.
 *
 * The REST API is the product's server extension (sandbox_kernel.jupyter.api).
 */

import {
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { Dialog, showDialog, showErrorMessage } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { Kernel, ServerConnection } from '@jupyterlab/services';
import { IStatusBar } from '@jupyterlab/statusbar';
import { Signal } from '@lumino/signaling';
import { Widget } from '@lumino/widgets';

import {
  IKernelReport,
  biggerMemory,
  cpuPercent,
  formatSize,
  reportRows,
  statusText
} from './format';

const PLUGIN_ID = 'sandbox-kernel-lab:plugin';
const PROVISIONER = 'sandbox-provisioner';
/** How often the status bar item reads the active sandbox kernel's figures (ms). */
const POLL_MS = 3000;
/** After a death, how often and how many times the recorded reason is looked for. */
const EXIT_RETRY_MS = 500;
const EXIT_TRIES = 20;
/** A PATCH while the kernel restarts (409): how often and how many times it is retried. */
const PATCH_RETRY_MS = 1000;
const PATCH_TRIES = 30;
const DEATH_STATES: ReadonlySet<Kernel.Status> = new Set([
  'dead',
  'restarting',
  'autorestarting'
]);

/** Errors of the sandbox REST API, with the server's message. */
class SandboxApiError extends Error {
  constructor(
    readonly status: number,
    message: string
  ) {
    super(message);
  }
}

/** Talks to /api/sandbox/kernels with the server's own auth (token, XSRF). */
class SandboxApi {
  constructor(private readonly settings: ServerConnection.ISettings) {}

  /** The report of kernel ``id``; null when the server says it is no sandbox kernel (404). */
  async get(id: string): Promise<IKernelReport | null> {
    const reply = await this.request(id, { method: 'GET' });
    return reply;
  }

  /**
   * Change the kernel's limits (any of memory, cpus, pids); its new report. The server
   * answers 409 while the kernel restarts: asked again (bounded) until it is up.
   */
  async patch(id: string, body: Record<string, unknown>): Promise<IKernelReport | null> {
    for (let i = 0; ; i++) {
      try {
        return await this.request(id, { method: 'PATCH', body: JSON.stringify(body) });
      } catch (error) {
        if (!(error instanceof SandboxApiError) || error.status !== 409 || i >= PATCH_TRIES) {
          throw error;
        }
      }
      await new Promise(resolve => window.setTimeout(resolve, PATCH_RETRY_MS));
    }
  }

  private async request(id: string, init: RequestInit): Promise<IKernelReport | null> {
    const url = URLExt.join(
      this.settings.baseUrl,
      'api/sandbox/kernels',
      encodeURIComponent(id)
    );
    const response = await ServerConnection.makeRequest(url, init, this.settings);
    if (response.status === 404) {
      return null;
    }
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const message =
        typeof data?.message === 'string'
          ? data.message
          : `${init.method} ${url} answered ${response.status}`;
      throw new SandboxApiError(response.status, message);
    }
    return data as IKernelReport;
  }
}

/** The shape of a kernelspec's metadata this extension reads. */
interface ISpecMetadata {
  metadata?: { kernel_provisioner?: { provisioner_name?: string } };
}

/**
 * Is kernelspec ``name`` a sandbox kernel? true / false from the kernelspecs the server
 * listed; undefined when they are not known (then the API answers it).
 */
function isSandboxSpec(app: JupyterFrontEnd, name: string): boolean | undefined {
  const specs = app.serviceManager.kernelspecs.specs;
  const spec = specs?.kernelspecs[name] as ISpecMetadata | undefined;
  if (spec === undefined) {
    return undefined;
  }
  return spec.metadata?.kernel_provisioner?.provisioner_name === PROVISIONER;
}

/** A table of [label, value] rows, for the dialogs. */
function table(rows: [string, string][], className: string): HTMLElement {
  const node = document.createElement('table');
  node.className = className;
  for (const [label, value] of rows) {
    const tr = node.insertRow();
    const th = document.createElement('th');
    th.textContent = label;
    tr.appendChild(th);
    tr.insertCell().textContent = value;
  }
  return node;
}

/**
 * The status bar item: follows the active notebook, polls its sandbox kernel (only while
 * there is one), shows the figures; a click opens the full report.
 */
class SandboxStatus extends Widget {
  readonly activeChanged = new Signal<this, void>(this);
  private panel: NotebookPanel | null = null;
  private kernelId: string | null = null;
  private timer: number | null = null;
  private lastCpu: { us: number | null; at: number } | null = null;
  private report: IKernelReport | null = null;
  private generation = 0;

  constructor(
    private readonly app: JupyterFrontEnd,
    private readonly api: SandboxApi
  ) {
    super();
    this.addClass('sk-SandboxStatus');
    this.node.title = 'Sandbox kernel: click for the full report';
    this.node.addEventListener('click', () => void this.showReport());
  }

  /** Is a sandbox kernel active (the status bar shows the item only then)? */
  get active(): boolean {
    return this.kernelId !== null;
  }

  /** Follow ``panel`` (the active notebook, or null). Called on tracker.currentChanged. */
  follow(panel: NotebookPanel | null): void {
    if (this.panel !== null) {
      this.panel.sessionContext.kernelChanged.disconnect(this.refresh, this);
    }
    this.panel = panel;
    if (panel !== null) {
      panel.sessionContext.kernelChanged.connect(this.refresh, this);
      void panel.sessionContext.ready.then(() => {
        if (this.panel === panel) {
          this.refresh();
        }
      });
    }
    this.refresh();
  }

  /** Read the figures now (a death, a restart, a changed limit). */
  poke(): void {
    if (this.kernelId !== null) {
      this.stopTimer();
      void this.tick(this.generation);
    }
  }

  /** Start or stop polling for the followed notebook's kernel. */
  private refresh(): void {
    const kernel = this.panel?.sessionContext.session?.kernel ?? null;
    const sandbox = kernel === null ? false : isSandboxSpec(this.app, kernel.name);
    const id = kernel !== null && sandbox !== false ? kernel.id : null;
    if (id === this.kernelId) {
      return;
    }
    this.stopTimer();
    this.generation += 1;
    this.kernelId = id;
    this.lastCpu = null;
    this.report = null;
    this.node.textContent = id === null ? '' : 'Sandbox …';
    this.activeChanged.emit();
    if (id !== null) {
      void this.tick(this.generation);
    }
  }

  private stopTimer(): void {
    if (this.timer !== null) {
      window.clearTimeout(this.timer);
      this.timer = null;
    }
  }

  /** One reading; schedules the next while the same kernel is followed. */
  private async tick(generation: number): Promise<void> {
    const id = this.kernelId;
    if (id === null) {
      return;
    }
    try {
      const report = await this.api.get(id);
      if (generation !== this.generation) {
        return;
      }
      if (report === null) {
        // the server knows no sandbox kernel of this id: stop polling it
        this.kernelId = null;
        this.node.textContent = '';
        this.activeChanged.emit();
        return;
      }
      const now = { us: report.usage?.cpu_usage_us ?? null, at: Date.now() };
      const cpu = cpuPercent(this.lastCpu, now);
      this.lastCpu = now;
      this.report = report;
      this.node.textContent = statusText(report, cpu);
      this.node.dataset.memoryLimit = String(report.limits.memory ?? '');
    } catch (error) {
      if (generation !== this.generation) {
        return;
      }
      this.node.textContent = 'Sandbox: no figures';
      this.node.title = `Sandbox kernel: ${(error as Error).message}`;
    }
    if (generation === this.generation) {
      this.stopTimer();
      this.timer = window.setTimeout(() => void this.tick(generation), POLL_MS);
    }
  }

  /** The dialog with every figure of the report. */
  private async showReport(): Promise<void> {
    if (this.kernelId === null) {
      return;
    }
    const report = (await this.api.get(this.kernelId).catch(() => null)) ?? this.report;
    if (report === null) {
      return;
    }
    const body = new Widget({ node: table(reportRows(report), 'sk-SandboxReport') });
    await showDialog({
      title: `Sandbox: ${report.display_name}`,
      body,
      buttons: [Dialog.okButton({ label: 'Close' })]
    });
  }
}

/**
 * Watches every notebook's kernel for deaths and shows why. One dialog per death: the
 * reason the server recorded after the status turned 'dead' or 'autorestarting' (restarts
 * asked for here or by the user carry an ``asked`` reason and show none).
 */
class DeathWatch {
  private readonly watched = new WeakSet<NotebookPanel>();
  /** kernel id -> the last_exit seen alive or shown, as JSON (a 'restarting' shows only new ones) */
  private readonly seen = new Map<string, string>();
  private readonly busy = new Set<string>();

  constructor(
    private readonly app: JupyterFrontEnd,
    private readonly api: SandboxApi,
    private readonly status: SandboxStatus | null
  ) {}

  /** Start watching ``panel``'s kernel status. Called for each notebook opened. */
  watch(panel: NotebookPanel): void {
    if (this.watched.has(panel)) {
      return;
    }
    this.watched.add(panel);
    panel.sessionContext.statusChanged.connect((context, status) => {
      const kernel = context.session?.kernel;
      if (kernel === null || kernel === undefined) {
        return;
      }
      if (isSandboxSpec(this.app, kernel.name) === false) {
        return;
      }
      if (status === 'idle' && !this.seen.has(kernel.id)) {
        void this.remember(kernel.id);
      }
      if (DEATH_STATES.has(status)) {
        this.status?.poke();
        void this.explain(panel, kernel.id, status);
      }
    });
  }

  /** Keep the kernel's current last_exit, so a later user restart does not show it again. */
  private async remember(id: string): Promise<void> {
    this.seen.set(id, 'null');
    const report = await this.api.get(id).catch(() => null);
    if (report !== null && !this.busy.has(id)) {
      this.seen.set(id, JSON.stringify(report.last_exit));
    }
  }

  /** Look for the recorded reason of this death (bounded), then show it. */
  private async explain(panel: NotebookPanel, id: string, status: Kernel.Status): Promise<void> {
    if (this.busy.has(id)) {
      return;
    }
    this.busy.add(id);
    try {
      const before = this.seen.get(id) ?? 'null';
      for (let i = 0; i < EXIT_TRIES; i++) {
        const report = await this.api.get(id).catch(() => null);
        const exit = report?.last_exit ?? null;
        const key = JSON.stringify(exit);
        const fresh = status === 'restarting' ? key !== before : true;
        if (report !== null && exit !== null && fresh) {
          this.seen.set(id, key);
          if (exit.asked) {
            return; // a restart or shutdown somebody asked for: nothing to explain
          }
          await this.show(panel, report);
          return;
        }
        if (report === null && i > 0) {
          return; // gone, or not a sandbox kernel
        }
        await new Promise(resolve => window.setTimeout(resolve, EXIT_RETRY_MS));
      }
    } finally {
      this.busy.delete(id);
    }
  }

  /** The dialog: the plain reason and, after an out-of-memory death, "Restart with ...". */
  private async show(panel: NotebookPanel, report: IKernelReport): Promise<void> {
    const exit = report.last_exit;
    if (exit === null) {
      return;
    }
    const body = document.createElement('div');
    body.className = 'sk-DeathReason';
    const reason = document.createElement('p');
    reason.className = 'sk-DeathReason-text';
    reason.textContent = exit.reason;
    body.appendChild(reason);
    const more = exit.oom_killed ? biggerMemory(report) : null;
    const note = document.createElement('p');
    if (exit.oom_killed) {
      note.textContent =
        more === null
          ? `The memory limit is already the most this server allows (${formatSize(
              report.ceilings.memory
            )}).`
          : `The kernel was restarted with its limit of ${formatSize(
              report.limits.memory
            )}; its variables are gone.`;
    } else {
      note.textContent = 'The kernel stopped; its variables are gone.';
    }
    body.appendChild(note);
    const buttons = [Dialog.cancelButton({ label: 'Close' })];
    if (more !== null) {
      buttons.push(Dialog.warnButton({ label: `Restart with ${formatSize(more)}` }));
    }
    const result = await showDialog({
      title: `${report.display_name} stopped`,
      body: new Widget({ node: body }),
      buttons
    });
    if (more === null || !result.button.accept) {
      return;
    }
    try {
      await this.api.patch(report.kernel_id, { memory: more });
      // the server restarts a dead kernel by itself: the new limit applies to it at once;
      // only a kernel still dead (no automatic restart) is restarted here
      const kernel = panel.sessionContext.session?.kernel;
      if (kernel && kernel.id === report.kernel_id && kernel.status === 'dead') {
        await kernel.restart();
      }
    } catch (error) {
      await showErrorMessage('Sandbox kernel not restarted', (error as Error).message);
    }
    this.status?.poke();
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'Sandbox kernels: figures in the status bar, the reason a kernel died',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [IStatusBar],
  activate: (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null
  ): void => {
    const api = new SandboxApi(app.serviceManager.serverSettings);
    let status: SandboxStatus | null = null;
    if (statusBar !== null) {
      const item = new SandboxStatus(app, api);
      status = item;
      statusBar.registerStatusItem(PLUGIN_ID, {
        item,
        align: 'left',
        rank: 5,
        isActive: () => item.active,
        activeStateChanged: item.activeChanged
      });
      tracker.currentChanged.connect((_, panel) => item.follow(panel));
      item.follow(tracker.currentWidget);
      // the kernelspecs may arrive after the first notebook: look again then
      void app.serviceManager.kernelspecs.ready.then(() => item.follow(tracker.currentWidget));
    }
    const deaths = new DeathWatch(app, api, status);
    tracker.forEach(panel => deaths.watch(panel));
    tracker.widgetAdded.connect((_, panel) => deaths.watch(panel));
  }
};

export default plugin;
